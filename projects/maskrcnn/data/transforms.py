"""Per-example transforms from a COCO-format TFDS example to one element of a batch.

Input examples are those of `coco_builder` (image and instance masks either still encoded,
as read with `SKIP_DECODING`, or decoded). `resize_and_pad_example` resizes so that the
shortest side is `min_size` unless that makes the longest side exceed `max_size` (Detectron2's
ResizeShortestEdge) or the image exceed the padded size `image_size`; it normalises, optionally
flips, and zero-pads bottom/right to `image_size`. Boxes are scaled by `image_scale`; the
resized size is made whole by the weights' `resize_rounding` rule ('floor' as torchvision's
GeneralizedRCNNTransform, 'round' as Detectron2's ResizeShortestEdge, computed in float64 as
they do; see serving_loader.resized_length), so the two can differ by less than a pixel.

`large_scale_jitter_example` (training) instead scales the image to a given fraction of the
padded size and cuts a window of the padded size out of it; instances left with no area in
the window are dropped. Channels can be reversed to BGR for weights trained that way; the
mean and std are then given in BGR order too.

Ground-truth masks are cropped to their box and resized to S x S here, on the host, so the
device never sees full-image masks. Bin (i, j) of a crop samples the full-resolution mask
bilinearly at the centre of the bin, i.e. at original-image point
(x1 + (j + 0.5) * w / S, y1 + (i + 0.5) * h / S) for the box (x1, y1, x2, y2) of size (w, h).
Instances without a mask (box-only annotations, `has_mask` False in the dataset) get
`gt_has_mask` False and an all-ones crop (their box); the mask loss should skip them.
"""

from typing import Any
from collections.abc import Callable, Sequence

import tensorflow as tf

Example = dict[str, Any]
BoolLike = bool | tf.Tensor
FloatLike = float | tf.Tensor


def _decode_image(image: tf.Tensor) -> tf.Tensor:
    """uint8 [h, w, 3] from encoded bytes (or as-is when already decoded)."""
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def _mask_crop_boxes(boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                     size: int) -> tf.Tensor:
    """`crop_and_resize` boxes sampling the centres of size x size bins of each box.

    Args:
        boxes: float32 [n, 4] xyxy in pixels of a height x width mask.
        height: mask height.
        width: mask width.
        size: S.

    Returns:
        float32 [n, 4] normalised yxyx, where 0 and 1 are the centres of the first and
        last pixel (the `crop_and_resize` convention).
    """
    x1, y1, x2, y2 = tf.unstack(boxes, axis=1)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    half_bin_x, half_bin_y = 0.5 * (x2 - x1) / size, 0.5 * (y2 - y1) / size
    # Continuous coordinate c is pixel index c - 0.5.
    ys = tf.stack([y1 + half_bin_y - 0.5, y2 - half_bin_y - 0.5], axis=1)
    xs = tf.stack([x1 + half_bin_x - 0.5, x2 - half_bin_x - 0.5], axis=1)
    ys = ys / tf.maximum(h - 1, 1)
    xs = xs / tf.maximum(w - 1, 1)
    # Clamping keeps samples of boxes touching the image border inside the mask (they
    # would read 0 otherwise) at the cost of a shift of at most half a pixel there.
    out = tf.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1)
    return tf.clip_by_value(out, 0.0, 1.0)


def crop_masks(masks: tf.Tensor, boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
               size: int) -> tf.Tensor:
    """Crops full-image instance masks to their boxes and resizes them to size x size.

    Args:
        masks: string [n] PNG-encoded masks, or uint8 [n, height, width, 1] (values 0/1).
        boxes: float32 [n, 4] xyxy in pixels of the full-resolution mask.
        height: mask height.
        width: mask width.
        size: S.

    Returns:
        float32 [n, S, S] in [0, 1] (bilinear).
    """
    crop_boxes = _mask_crop_boxes(boxes, height, width, size)
    if masks.dtype == tf.string:
        # Decode one mask at a time: a crowded image's full masks never coexist in memory.
        def crop_one(args):
            encoded, box = args
            mask = tf.io.decode_png(encoded, channels=1)[None]
            return tf.image.crop_and_resize(mask, box[None], [0], [size, size])[0, :, :, 0]

        return tf.map_fn(crop_one, (masks, crop_boxes),
                         fn_output_signature=tf.TensorSpec([size, size], tf.float32))
    box_indices = tf.range(tf.shape(masks)[0])
    return tf.image.crop_and_resize(masks, crop_boxes, box_indices, [size, size])[..., 0]


def _select_instances(objects: Example, window: tf.Tensor, max_instances: int,
                      drop_invalid: bool) -> tuple[tf.Tensor, ...]:
    """Boxes clipped to `window`, classes 1..K, validity, has_mask and masks (at most M),
    and the number of instances beyond M that are left out (int32 scalar).

    Args:
        objects: the example's instances.
        window: float32 [4] xyxy region of the original image that is kept.
        max_instances: M.
        drop_invalid: drop crowd instances and those without area inside `window`
            (training) instead of keeping them with validity False (evaluation).
    """
    boxes = tf.reshape(tf.cast(objects['bbox'], tf.float32), [-1, 4])
    boxes = tf.minimum(tf.maximum(boxes, tf.tile(window[:2], [2])), tf.tile(window[2:], [2]))
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    is_crowd = tf.cast(objects['is_crowd'], tf.bool)
    valid = nonempty & tf.logical_not(is_crowd)
    # Datasets built before has_mask existed have a mask for every instance.
    has_mask = tf.cast(objects.get('has_mask', tf.ones_like(is_crowd)), tf.bool)
    keep = tf.range(tf.shape(boxes)[0])
    if drop_invalid:
        keep = tf.boolean_mask(keep, valid)
    truncated = tf.maximum(tf.size(keep) - max_instances, 0)
    keep = keep[:max_instances]
    classes = tf.cast(tf.gather(objects['label'], keep), tf.int32) + 1
    return (tf.gather(boxes, keep), classes, tf.gather(valid, keep), tf.gather(has_mask, keep),
            tf.gather(objects['mask'], keep), truncated)


def pad_to(x: tf.Tensor, length: int) -> tf.Tensor:
    """Zero-pads (or False-pads) the leading dimension of `x` to `length`."""
    pad = tf.zeros(tf.concat([[length - tf.shape(x)[0]], tf.shape(x)[1:]], 0), x.dtype)
    out = tf.concat([x, pad], axis=0)
    return tf.ensure_shape(out, [length] + x.shape[1:].as_list())


_INSTANCE_KEYS = ('gt_boxes', 'gt_classes', 'gt_valid', 'gt_has_mask', 'gt_masks')


def pad_example(example: Example, image_size: Sequence[int], max_instances: int) -> Example:
    """Zero-pads the image to `image_size` and the instances to `max_instances`."""
    out_h, out_w = image_size
    padded = dict(example)
    padded['image'] = tf.ensure_shape(
        tf.image.pad_to_bounding_box(example['image'], 0, 0, out_h, out_w), [out_h, out_w, 3])
    for key in _INSTANCE_KEYS:
        padded[key] = pad_to(example[key], max_instances)
    return padded


def padded_shapes(image_size: Sequence[int], max_instances: int,
                  gt_mask_size: int) -> dict[str, list[int]]:
    """Shapes of a padded example, for `padded_batch` of unpadded ones (pad=False)."""
    m, s = max_instances, gt_mask_size
    return {'image': [*image_size, 3], 'image_id': [], 'orig_size': [2], 'image_size': [2],
            'image_scale': [], 'gt_boxes': [m, 4], 'gt_classes': [m], 'gt_valid': [m],
            'gt_has_mask': [m], 'gt_masks': [m, s, s], 'gt_truncated': [], 'batch_mask': []}


def _normalise_and_resize(image: tf.Tensor, size: tf.Tensor, pixel_mean: Sequence[float],
                          pixel_std: Sequence[float]) -> tf.Tensor:
    """float32 (image - mean) / std, bilinearly resized to `size` (half-pixel centres)."""
    # Normalising commutes with bilinear resizing; done first, it touches fewer pixels
    # (the broadcast over 3 channels is the slow part) when the image is enlarged.
    image = ((tf.cast(image, tf.float32) - tf.constant(pixel_mean, tf.float32)) *
             tf.constant([1.0 / s for s in pixel_std], tf.float32))
    return tf.image.resize(image, size, method='bilinear')


# geometry(h, w) -> (scale, crop offset (y0, x0) into the resized image or None for none).
Geometry = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor | None]]
RESIZE_ROUNDINGS = ('floor', 'round')


def resized_length(length: tf.Tensor, scale: tf.Tensor, rounding: str) -> tf.Tensor:
    """int32 side length after resizing by `scale` (float64, as the references compute):
    'floor' drops the fraction (torchvision), 'round' rounds halves up (Detectron2)."""
    x = tf.cast(length, tf.float64) * tf.cast(scale, tf.float64)
    if rounding == 'floor':
        return tf.cast(tf.floor(x), tf.int32)
    if rounding == 'round':
        return tf.cast(tf.floor(x + 0.5), tf.int32)
    raise ValueError(f'resize_rounding must be one of {RESIZE_ROUNDINGS}, got {rounding!r}.')


def _transform(example: Example, geometry: Geometry, *, flip: BoolLike,
               image_size: Sequence[int], pixel_mean: Sequence[float],
               pixel_std: Sequence[float], channel_order: str, max_instances: int,
               gt_mask_size: int, drop_invalid: bool, pad: bool,
               resize_rounding: str) -> Example:
    """Resizes by `geometry`'s scale, crops at its offset, normalises, flips, pads."""
    out_h, out_w = image_size
    image = _decode_image(example['image'])
    if channel_order == 'BGR':
        image = tf.reverse(image, [2])
    elif channel_order != 'RGB':
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}.")
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    scale, offset = geometry(h, w)
    new_h = tf.maximum(resized_length(height, scale, resize_rounding), 1)
    new_w = tf.maximum(resized_length(width, scale, resize_rounding), 1)
    scale = tf.cast(scale, tf.float32)  # box arithmetic stays in float32
    y0, x0 = (0, 0) if offset is None else tf.unstack(offset)
    size_h, size_w = tf.minimum(new_h - y0, out_h), tf.minimum(new_w - x0, out_w)
    kept_h, kept_w = tf.cast(size_h, tf.float32), tf.cast(size_w, tf.float32)
    corner = tf.cast(tf.stack([x0, y0]), tf.float32)
    # The part of the original image that ends up in the output, in original pixels.
    window = tf.concat([corner / scale, tf.minimum((corner + [kept_w, kept_h]) / scale,
                                                   [w, h])], 0)

    boxes, classes, valid, has_mask, masks, truncated = _select_instances(
        example['objects'], window, max_instances, drop_invalid)
    gt_masks = crop_masks(masks, boxes, height, width, gt_mask_size)  # [n, S, S]
    # A box-only instance has no mask: its box is the best stand-in (gt_has_mask False).
    gt_masks = tf.where(has_mask[:, None, None], gt_masks, 1.0)

    image = _normalise_and_resize(image, tf.stack([new_h, new_w]), pixel_mean, pixel_std)
    if offset is not None:
        image = image[y0:y0 + size_h, x0:x0 + size_w]
    boxes = boxes * scale - tf.tile(corner, [2])
    boxes = tf.minimum(tf.maximum(boxes, 0.0), tf.stack([kept_w, kept_h] * 2))

    def flipped():
        x1, y1, x2, y2 = tf.unstack(boxes, axis=1)
        # Cropping then mirroring equals cropping the mirrored mask with the mirrored box.
        return (tf.reverse(image, [1]), tf.stack([kept_w - x2, y1, kept_w - x1, y2], 1),
                tf.reverse(gt_masks, [2]))

    image, boxes, gt_masks = tf.cond(tf.convert_to_tensor(flip), flipped,
                                     lambda: (image, boxes, gt_masks))
    out = {
        'image': image,
        'image_id': tf.cast(example['image/id'], tf.int32),
        'orig_size': tf.stack([height, width]),
        'image_size': tf.stack([size_h, size_w]),
        'image_scale': scale,
        'gt_boxes': tf.maximum(boxes, 0.0),
        'gt_classes': classes,
        'gt_valid': valid,
        'gt_has_mask': has_mask,
        'gt_masks': gt_masks,
        'gt_truncated': truncated,
        'batch_mask': tf.constant(1.0, tf.float32),
    }
    # Padding inside `padded_batch` instead writes the large arrays once, not twice.
    return pad_example(out, image_size, max_instances) if pad else out


def resize_and_pad_example(example: Example, *, min_size: FloatLike, max_size: float,
                           flip: BoolLike, image_size: Sequence[int],
                           pixel_mean: Sequence[float], pixel_std: Sequence[float],
                           max_instances: int, gt_mask_size: int, drop_invalid: bool,
                           channel_order: str = 'RGB', pad: bool = True,
                           resize_rounding: str = 'round') -> Example:
    """Deterministic part of preprocessing: one example to one element of the batch.

    Args:
        example: a `coco_builder` example (image and masks encoded or decoded).
        min_size: target shortest side (scalar, may be a tensor).
        max_size: cap on the longest side.
        flip: whether to flip horizontally (bool, may be a tensor).
        image_size: (H, W) padded output size.
        pixel_mean: mean per channel (in `channel_order`), 0-255 units.
        pixel_std: standard deviation per channel, 0-255 units.
        max_instances: M.
        gt_mask_size: S.
        drop_invalid: drop crowd and empty-box instances (training) instead of keeping them
            with `gt_valid=False` (evaluation).
        channel_order: 'RGB', or 'BGR' for weights trained on BGR input (Detectron2's MSRA
            weights).
        pad: pad to `image_size` and `max_instances`; False leaves the image at its resized
            size and only the kept instances, for `padded_batch` with `padded_shapes`.
        resize_rounding: 'floor' (torchvision) or 'round' (Detectron2): how the resized
            size is made whole (see `resized_length`).

    Returns:
        The keys of CONVENTIONS.md without the batch dimension: image [H, W, 3],
        image_id [], orig_size [2], image_size [2], image_scale [], gt_boxes [M, 4],
        gt_classes [M], gt_valid [M], gt_has_mask [M], gt_masks [M, S, S],
        gt_truncated [] (instances beyond M left out), batch_mask [].
    """
    out_h, out_w = image_size

    def geometry(h, w):
        # float64 like the references (Python floats), so that e.g. 500 x 800 / 375 floors
        # to 1066 exactly as torchvision's does.
        h, w = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
        scale = tf.minimum(tf.cast(min_size, tf.float64) / tf.minimum(h, w),
                           tf.cast(max_size, tf.float64) / tf.maximum(h, w))
        return tf.minimum(scale, tf.minimum(out_h / h, out_w / w)), None  # fit the padding

    return _transform(example, geometry, flip=flip, image_size=image_size,
                      pixel_mean=pixel_mean, pixel_std=pixel_std, channel_order=channel_order,
                      max_instances=max_instances, gt_mask_size=gt_mask_size,
                      drop_invalid=drop_invalid, pad=pad, resize_rounding=resize_rounding)


def large_scale_jitter_example(example: Example, *, scale_factor: FloatLike,
                               crop_fraction: tf.Tensor, flip: BoolLike,
                               image_size: Sequence[int], pixel_mean: Sequence[float],
                               pixel_std: Sequence[float], max_instances: int,
                               gt_mask_size: int, channel_order: str = 'RGB',
                               pad: bool = True, resize_rounding: str = 'round') -> Example:
    """Large-scale jitter (Ghiasi et al. 2021; Detectron2's ResizeScale + FixedSizeCrop).

    The image is resized to fit `scale_factor` times the padded size (H, W), keeping its
    aspect ratio; where it is larger than (H, W) a window of that size is cut out at
    `crop_fraction` of the room left, and the rest is zero-padded. Boxes are clipped to the
    window and masks cropped to the clipped boxes; crowd instances and instances left with no
    area are dropped (training only).

    Args:
        example: a `coco_builder` example.
        scale_factor: target size relative to (H, W), e.g. drawn from [0.1, 2.0].
        crop_fraction: float [2] in [0, 1): crop start (y, x) as a fraction of the room.
        flip, image_size, pixel_mean, pixel_std, max_instances, gt_mask_size,
            channel_order, pad, resize_rounding: see `resize_and_pad_example`.

    Returns:
        See `resize_and_pad_example`; boxes are in pixels of the cropped image.
    """
    out_h, out_w = image_size

    def geometry(h, w):
        scale = tf.cast(scale_factor, tf.float32) * tf.minimum(out_h / h, out_w / w)
        resized = tf.cast(tf.maximum(tf.stack([resized_length(h, scale, resize_rounding),
                                               resized_length(w, scale, resize_rounding)]),
                                     1), tf.float32)
        room = tf.maximum(resized - [out_h, out_w], 0.0)
        offset = tf.minimum(tf.floor(crop_fraction * (room + 1.0)), room)
        return scale, tf.cast(offset, tf.int32)

    return _transform(example, geometry, flip=flip, image_size=image_size,
                      pixel_mean=pixel_mean, pixel_std=pixel_std, channel_order=channel_order,
                      max_instances=max_instances, gt_mask_size=gt_mask_size,
                      drop_invalid=True, pad=pad, resize_rounding=resize_rounding)
