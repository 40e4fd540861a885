"""Runs an exported Mask R-CNN (`export.py`) with nothing but jax and numpy.

This file imports no other part of the project, Flax or TensorFlow, so it can be
copied next to an exported model and used on its own:

    model = ServingModel('/tmp/exported')
    image, image_size, scale = model.preprocess(photo_uint8)      # one photo
    out = model(image[None], image_size[None])                     # a batch of B
    boxes_in_photo = boxes_to_original(out['detection_boxes'][0], image_size,
                                       photo_uint8.shape[:2])

An export directory holds `model.jax` (the serialised `jax.export.Exported`),
`params.npz` (its weights, passed as arguments so the program stays small) and
`metadata.json` (input size, normalisation, class names; see `export.py`).

`preprocess` reproduces the evaluation pipeline of data/input_pipeline.py in numpy:
shortest side to `eval_min_size` with the longest side capped at `max_size` and the
image kept inside the padded size, the resized size rounded by the weights'
`resize_rounding` rule (metadata), TensorFlow's bilinear resize (half-pixel centres,
no antialiasing), `(x - pixel_mean) / pixel_std` (channels reversed first for BGR
models), zero padding bottom/right.
"""

import json
import os
from collections.abc import Sequence

import jax
import numpy as np

MODEL_FILENAME = 'model.jax'
PARAMS_FILENAME = 'params.npz'
METADATA_FILENAME = 'metadata.json'


def param_key(index: int) -> str:
    """Name of the `index`-th flattened weight array in params.npz."""
    return f'param_{index:05d}'


RESIZE_ROUNDINGS = ('floor', 'round')


def resized_length(length: float, scale: float, rounding: str) -> int:
    """A side's length after resizing by `scale`, under the weights' convention.

    'floor' drops the fraction, as torchvision's GeneralizedRCNNTransform (its
    interpolate computes floor(size * scale)); 'round' rounds halves up, as
    Detectron2's ResizeShortestEdge (int(size * scale + 0.5)). Both in float64,
    as the references compute.
    """
    x = np.float64(length) * np.float64(scale)
    if rounding == 'floor':
        return int(np.floor(x))
    if rounding == 'round':
        return int(np.floor(x + 0.5))
    raise ValueError(f'resize_rounding must be one of {RESIZE_ROUNDINGS}, got {rounding!r}')


def resize_scale(height: int, width: int, min_size: float, max_size: float,
                 padded_size: Sequence[int], rounding: str = 'round'
                 ) -> tuple[float, int, int]:
    """Scale and resized (height, width) of the evaluation pipeline.

    Args:
      height, width: original image size.
      min_size: target shortest side.
      max_size: cap on the longest side.
      padded_size: (H, W) the resized image must fit in.
      rounding: 'floor' or 'round', see `resized_length`.

    Returns:
      (scale, new_height, new_width), new size = resized_length(size, scale), at
      least 1 and at most the padded size.
    """
    h, w = float(height), float(width)
    scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
    scale = min(scale, float(padded_size[0]) / h, float(padded_size[1]) / w)
    new_h = int(np.clip(resized_length(h, scale, rounding), 1, padded_size[0]))
    new_w = int(np.clip(resized_length(w, scale, rounding), 1, padded_size[1]))
    return scale, new_h, new_w


def boxes_to_original(boxes_xyxy: np.ndarray, image_size: Sequence[int],
                      orig_size: Sequence[int]) -> np.ndarray:
    """Boxes [..., 4] xyxy in resized pixels -> original pixels, per axis.

    The resized sides were rounded to whole pixels, so each axis is mapped back by
    its own ratio (orig / resized), as torchvision's and Detectron2's postprocessing
    do, rather than by the one scale.
    """
    ratio_y = float(orig_size[0]) / float(image_size[0])
    ratio_x = float(orig_size[1]) / float(image_size[1])
    return np.asarray(boxes_xyxy, np.float64) * np.asarray([ratio_x, ratio_y, ratio_x, ratio_y])


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source index and upper weight of each output pixel (half-pixel)."""
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * (
        np.float32(in_size) / np.float32(out_size)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, (src - lower).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 [height, width, C] bilinear resize equal to `tf.image.resize(image, size)`.

    Half-pixel centres and no antialiasing, as the training and evaluation
    pipelines resize.
    """
    image = np.asarray(image, np.float32)
    y0, y1, fy = _linear_taps(image.shape[0], height)
    x0, x1, fx = _linear_taps(image.shape[1], width)
    fx = fx[None, :, None]
    top, bottom = image[y0], image[y1]
    top = top[:, x0] + (top[:, x1] - top[:, x0]) * fx
    bottom = bottom[:, x0] + (bottom[:, x1] - bottom[:, x0]) * fx
    return top + (bottom - top) * fy[:, None, None]


def preprocess(image: np.ndarray, *, padded_size: Sequence[int], min_size: float,
               max_size: float, pixel_mean: Sequence[float], pixel_std: Sequence[float],
               channel_order: str = 'RGB', resize_rounding: str = 'round'
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """One uint8 RGB image [h, w, 3] to the model's input.

    `channel_order` 'BGR' reverses the channels first, for weights trained on BGR
    input; `pixel_mean` and `pixel_std` are then in BGR order too.
    `resize_rounding` is the weights' rule for the resized size (`resized_length`).

    Returns:
      (image float32 [H, W, 3] normalised and zero-padded, image_size int32 [2]
      (height, width) before padding, scale = resized / original).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'expected an RGB image [h, w, 3], got shape {image.shape}')
    if channel_order not in ('RGB', 'BGR'):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    if channel_order == 'BGR':
        image = image[..., ::-1]
    scale, new_h, new_w = resize_scale(image.shape[0], image.shape[1], min_size, max_size,
                                       padded_size, resize_rounding)
    resized = resize_bilinear(image, new_h, new_w)
    normalised = (resized - np.asarray(pixel_mean, np.float32)) / np.asarray(pixel_std,
                                                                            np.float32)
    out = np.zeros((padded_size[0], padded_size[1], 3), np.float32)
    out[:new_h, :new_w] = normalised
    return out, np.asarray([new_h, new_w], np.int32), scale


def preprocess_with_metadata(image: np.ndarray, metadata: dict, padded_size: Sequence[int]
                             ) -> tuple[np.ndarray, np.ndarray, float]:
    """`preprocess` with the normalisation and resize rule of an export's metadata.json."""
    m = metadata
    # Exports that predate the setting rounded to nearest: 'round' differs only at halves.
    return preprocess(image, padded_size=padded_size, min_size=m['eval_min_size'],
                      max_size=m['max_size'], pixel_mean=m['pixel_mean'],
                      pixel_std=m['pixel_std'], channel_order=m['channel_order'],
                      resize_rounding=m.get('resize_rounding', 'round'))


class ServingModel:
    """An exported detector: `model(images, image_sizes)` -> dict of numpy arrays.

    Outputs (D = detections per image): `detection_boxes` float32 [B, D, 4] xyxy in
    resized-image pixels, `detection_scores` [B, D], `detection_classes` int32 [B, D]
    (1..K, 0 where invalid; label k is `metadata['class_names'][k - 1]`),
    `detection_valid` bool [B, D], `detection_masks` float32 [B, D, m, m]
    probabilities inside each box.
    """

    def __init__(self, directory: str):
        with open(os.path.join(directory, METADATA_FILENAME), encoding='utf-8') as f:
            self.metadata = json.load(f)
        with open(os.path.join(directory, MODEL_FILENAME), 'rb') as f:
            self.exported = jax.export.deserialize(bytearray(f.read()))
        with np.load(os.path.join(directory, PARAMS_FILENAME)) as npz:
            self.params = [np.asarray(npz[param_key(i)]) for i in range(len(npz.files))]
        self.batch_size = int(self.metadata['batch_size'])
        self.padded_size = (int(self.metadata['height']), int(self.metadata['width']))

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata['class_names'])

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """See the module function `preprocess`; sizes and statistics from the metadata."""
        return preprocess_with_metadata(image, self.metadata, self.padded_size)

    def __call__(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """Runs the exported function.

        Args:
          images: float32 [B, H, W, 3] preprocessed images (B, H, W as exported).
          image_sizes: int32 [B, 2] (height, width) before padding.
        """
        expected = (self.batch_size, *self.padded_size, 3)
        if tuple(np.shape(images)) != expected:
            raise ValueError(f'this model was exported for images of shape {expected}, '
                             f'got {tuple(np.shape(images))}; pad the batch or re-export')
        outputs = self.exported.call(self.params, np.asarray(images, np.float32),
                                     np.asarray(image_sizes, np.int32))
        return {k: np.asarray(v) for k, v in outputs.items()}
