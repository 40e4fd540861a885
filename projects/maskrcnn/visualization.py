"""Detections drawn for people: predict.py's PNGs and the trainer's TensorBoard images.

Drawing is imgviz's `instances2rgb` (masks blended in per-instance colours, boxes in
per-class colours, "name score" captions); this module only converts the model's
arrays (CONVENTIONS.md: xyxy boxes, labels 1..K, box-relative masks) to its inputs.
"""

from typing import Any
from collections.abc import Sequence

import imgviz
import numpy as np
from PIL import Image

from projects.maskrcnn.ops import mask_paste

SEPARATOR_PIXELS = 4  # white gap between prediction and ground truth


def captions(classes: np.ndarray, scores: np.ndarray | None,
             class_names: Sequence[str] | None) -> list[str]:
    """'name 0.87' per instance ('name' alone without scores); label k is class_names[k - 1]."""
    out = []
    for i, label in enumerate(np.asarray(classes).astype(int)):
        if class_names is not None and 1 <= label <= len(class_names):
            name = str(class_names[label - 1])
        else:
            name = f'class {label}'
        out.append(name if scores is None else f'{name} {float(scores[i]):.2f}')
    return out


def draw_instances(image: np.ndarray, boxes_xyxy: np.ndarray, classes: np.ndarray,
                   scores: np.ndarray | None = None, masks: np.ndarray | None = None,
                   class_names: Sequence[str] | None = None) -> np.ndarray:
    """Draws instances on a copy of an image.

    Args:
      image: uint8 [h, w, 3] RGB.
      boxes_xyxy: [N, 4] boxes in pixels of `image`.
      classes: [N] labels 1..K (colour and caption).
      scores: [N] scores shown after the class name, or None.
      masks: bool [N, h, w] full-image masks, or None.
      class_names: K names; label k is `class_names[k - 1]`.

    Returns:
      uint8 [h, w, 3].
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'expected a uint8 RGB image [h, w, 3], got {image.dtype} '
                         f'{image.shape}')
    boxes_xyxy = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    if len(boxes_xyxy) == 0:
        return image.copy()
    height, width = image.shape[:2]
    boxes = np.clip(boxes_xyxy, 0, [width - 1, height - 1] * 2)
    side = min(height, width)
    return imgviz.instances2rgb(
        image, labels=np.asarray(classes).astype(int),
        bboxes=boxes[:, [1, 0, 3, 2]],  # imgviz wants yxyx
        masks=None if masks is None else np.asarray(masks).astype(bool),
        captions=captions(classes, scores, class_names),
        font_size=int(np.clip(side // 32, 8, 24)), line_width=int(np.clip(side // 200, 1, 4)))


def denormalise(image: np.ndarray, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                channel_order: str = 'RGB') -> np.ndarray:
    """Undoes the pipeline's `(x - mean) / std` (and BGR order): float [h, w, 3] -> uint8 RGB."""
    pixels = np.asarray(image, np.float32) * np.asarray(pixel_std, np.float32) + np.asarray(
        pixel_mean, np.float32)
    if channel_order == 'BGR':
        pixels = pixels[..., ::-1]
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width * factor, height * factor),
                                                    Image.Resampling.BILINEAR))


def _draw_box_masks(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray,
                    scores: np.ndarray | None, box_masks: np.ndarray,
                    class_names: Sequence[str] | None, factor: int) -> np.ndarray:
    """Draws instances whose masks are box-relative [N, m, m], on an image `factor`x larger."""
    boxes = np.asarray(boxes, np.float32) * factor
    masks = mask_paste.paste_masks(box_masks, boxes, image.shape[0], image.shape[1])
    return draw_instances(image, boxes, classes, scores, masks, class_names)


def eval_image_summaries(batch: dict[str, Any], predictions: dict[str, Any],
                         class_names: Sequence[str] | None, *, pixel_mean: Sequence[float],
                         pixel_std: Sequence[float], channel_order: str = 'RGB',
                         max_images: int = 4, score_threshold: float = 0.5,
                         min_display_size: int = 256) -> dict[str, np.ndarray]:
    """Prediction | ground truth images of the first real examples of an evaluation batch.

    Args:
      batch: numpy batch of CONVENTIONS.md (`image`, `image_id`, `image_size`,
        `gt_boxes`, `gt_classes`, `gt_masks`, optionally `gt_has_mask`, `batch_mask`).
      predictions: the detector's evaluation outputs for the batch (numpy).
      class_names: K names; label k is `class_names[k - 1]`.
      pixel_mean, pixel_std, channel_order: the normalisation of `batch['image']`.
      max_images: at most this many images.
      score_threshold: detections below this score are not drawn.
      min_display_size: small images are enlarged by an integer factor until their
        shortest side reaches this, so that captions stay readable.

    Returns:
      {'valid/predictions_vs_gt/<image_id>': uint8 [h, 2 * w + gap, 3]}: the
      resized (unpadded) image with predictions on the left, ground truth on the right.
    """
    out = {}
    real = np.flatnonzero(np.asarray(batch['batch_mask']) > 0)[:max_images]
    for i in real:
        height, width = (int(v) for v in batch['image_size'][i])
        factor = max(1, -(-min_display_size // max(1, min(height, width))))
        image = _upscale(denormalise(batch['image'][i, :height, :width], pixel_mean,
                                     pixel_std, channel_order), factor)
        keep = (np.asarray(predictions['detection_valid'][i], bool)
                & (np.asarray(predictions['detection_classes'][i]) > 0)
                & (np.asarray(predictions['detection_scores'][i]) >= score_threshold))
        pred = _draw_box_masks(
            image, predictions['detection_boxes'][i][keep],
            predictions['detection_classes'][i][keep],
            predictions['detection_scores'][i][keep],
            predictions['detection_masks'][i][keep], class_names, factor)
        gt_keep = np.asarray(batch['gt_classes'][i]) > 0
        gt_masks = np.asarray(batch['gt_masks'][i], np.float32)
        if 'gt_has_mask' in batch:  # box-only instances: draw the box alone
            gt_masks = np.where(np.asarray(batch['gt_has_mask'][i], bool)[:, None, None],
                                gt_masks, 0.0)
        gt = _draw_box_masks(image, batch['gt_boxes'][i][gt_keep],
                             batch['gt_classes'][i][gt_keep], None, gt_masks[gt_keep],
                             class_names, factor)
        gap = np.full((image.shape[0], SEPARATOR_PIXELS, 3), 255, np.uint8)
        out[f'valid/predictions_vs_gt/{int(batch["image_id"][i])}'] = np.concatenate(
            [pred, gap, gt], axis=1)
    return out
