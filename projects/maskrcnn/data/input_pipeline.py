"""tf.data pipeline from COCO-format TFDS examples to the batch of CONVENTIONS.md.

Input examples are those of `coco_builder` (image and instance masks either still encoded,
as read with `SKIP_DECODING`, or decoded). Each example is resized so that its shortest side
is `min_size` unless that makes the longest side exceed `max_size` (Detectron2's
ResizeShortestEdge) or the image exceed the padded size `image_size`, normalised, optionally
flipped, and zero-padded bottom/right to `image_size`. Boxes are scaled by `image_scale`; the
resized size is rounded to whole pixels, so the two can differ by less than half a pixel.

Ground-truth masks are cropped to their box and resized to S x S here, on the host, so the
device never sees full-image masks. Bin (i, j) of a crop samples the full-resolution mask
bilinearly at the centre of the bin, i.e. at original-image point
(x1 + (j + 0.5) * w / S, y1 + (i + 0.5) * h / S) for the box (x1, y1, x2, y2) of size (w, h).

Random augmentation (shortest side, flip) uses stateless ops seeded per example from the
pipeline seed and the example's position in the stream, so the stream is reproducible and
its position can be checkpointed.
"""

import math
from typing import Any, Sequence, Union

import tensorflow as tf
import tensorflow_datasets as tfds

Example = dict[str, Any]
BoolLike = Union[bool, tf.Tensor]
FloatLike = Union[float, tf.Tensor]

# `as_dataset(decoders=SKIP_DECODING)` reads images and masks still encoded: shuffle
# buffers stay small and decoding happens in the parallel map.
SKIP_DECODING = {'image': tfds.decode.SkipDecoding(),
                  'objects': {'mask': tfds.decode.SkipDecoding()}}


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


def _select_instances(objects: Example, height: tf.Tensor, width: tf.Tensor,
                      max_instances: int, drop_invalid: bool) -> tuple[tf.Tensor, ...]:
    """Clipped boxes, classes 1..K, validity and masks of the kept instances (at most M)."""
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    boxes = tf.reshape(tf.cast(objects['bbox'], tf.float32), [-1, 4])
    boxes = tf.minimum(tf.maximum(boxes, 0.0), tf.stack([w, h, w, h]))
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    valid = nonempty & tf.logical_not(tf.cast(objects['is_crowd'], tf.bool))
    keep = tf.range(tf.shape(boxes)[0])
    if drop_invalid:
        keep = tf.boolean_mask(keep, valid)
    keep = keep[:max_instances]
    classes = tf.cast(tf.gather(objects['label'], keep), tf.int32) + 1
    return (tf.gather(boxes, keep), classes, tf.gather(valid, keep),
            tf.gather(objects['mask'], keep))


def _pad_to(x: tf.Tensor, length: int) -> tf.Tensor:
    """Zero-pads (or False-pads) the leading dimension of `x` to `length`."""
    pad = tf.zeros(tf.concat([[length - tf.shape(x)[0]], tf.shape(x)[1:]], 0), x.dtype)
    out = tf.concat([x, pad], axis=0)
    return tf.ensure_shape(out, [length] + x.shape[1:].as_list())


def resize_and_pad_example(example: Example, *, min_size: FloatLike, max_size: float,
                           flip: BoolLike, image_size: Sequence[int],
                           pixel_mean: Sequence[float], pixel_std: Sequence[float],
                           max_instances: int, gt_mask_size: int,
                           drop_invalid: bool) -> Example:
    """Deterministic part of preprocessing: one example to one element of the batch.

    Args:
        example: a `coco_builder` example (image and masks encoded or decoded).
        min_size: target shortest side (scalar, may be a tensor).
        max_size: cap on the longest side.
        flip: whether to flip horizontally (bool, may be a tensor).
        image_size: (H, W) padded output size.
        pixel_mean: RGB mean, 0-255 units.
        pixel_std: RGB standard deviation, 0-255 units.
        max_instances: M.
        gt_mask_size: S.
        drop_invalid: drop crowd and empty-box instances (training) instead of keeping them
            with `gt_valid=False` (evaluation).

    Returns:
        The keys of CONVENTIONS.md without the batch dimension: image [H, W, 3],
        image_id [], orig_size [2], image_size [2], image_scale [], gt_boxes [M, 4],
        gt_classes [M], gt_valid [M], gt_masks [M, S, S], batch_mask [].
    """
    out_h, out_w = image_size
    image = _decode_image(example['image'])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    scale = tf.minimum(tf.cast(min_size, tf.float32) / tf.minimum(h, w),
                       tf.cast(max_size, tf.float32) / tf.maximum(h, w))
    scale = tf.minimum(scale, tf.minimum(out_h / h, out_w / w))  # never exceed the padding
    new_h = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, out_h)
    new_w = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, out_w)

    boxes, classes, valid, masks = _select_instances(
        example['objects'], height, width, max_instances, drop_invalid)
    gt_masks = crop_masks(masks, boxes, height, width, gt_mask_size)  # [n, S, S]

    image = tf.image.resize(image, tf.stack([new_h, new_w]), method='bilinear')
    image = (image - tf.constant(pixel_mean, tf.float32)) / tf.constant(pixel_std, tf.float32)
    boxes = boxes * scale
    resized_w = tf.cast(new_w, tf.float32)
    boxes = tf.minimum(boxes, tf.stack([resized_w, tf.cast(new_h, tf.float32)] * 2))

    def flipped():
        x1, y1, x2, y2 = tf.unstack(boxes, axis=1)
        # Cropping then mirroring equals cropping the mirrored mask with the mirrored box.
        return (tf.reverse(image, [1]), tf.stack([resized_w - x2, y1, resized_w - x1, y2], 1),
                tf.reverse(gt_masks, [2]))

    image, boxes, gt_masks = tf.cond(tf.convert_to_tensor(flip), flipped,
                                     lambda: (image, boxes, gt_masks))
    boxes = tf.maximum(boxes, 0.0)
    return {
        'image': tf.ensure_shape(tf.image.pad_to_bounding_box(image, 0, 0, out_h, out_w),
                                 [out_h, out_w, 3]),
        'image_id': tf.cast(example['image/id'], tf.int32),
        'orig_size': tf.stack([height, width]),
        'image_size': tf.stack([new_h, new_w]),
        'image_scale': scale,
        'gt_boxes': _pad_to(boxes, max_instances),
        'gt_classes': _pad_to(classes, max_instances),
        'gt_valid': _pad_to(valid, max_instances),
        'gt_masks': _pad_to(gt_masks, max_instances),
        'batch_mask': tf.constant(1.0, tf.float32),
    }


def preprocess_for_train(example: Example, *, seed: tf.Tensor, image_size: Sequence[int],
                         train_min_sizes: Sequence[int], max_size: float,
                         horizontal_flip: bool, pixel_mean: Sequence[float],
                         pixel_std: Sequence[float], max_instances: int,
                         gt_mask_size: int) -> Example:
    """Random shortest side from `train_min_sizes` and random flip, then resize and pad.

    Crowd instances and instances with empty boxes are dropped; the first `max_instances`
    of the others are kept.

    Args:
        example: a `coco_builder` example.
        seed: int32/int64 [2] stateless seed of this example.
        image_size, max_size, pixel_mean, pixel_std, max_instances, gt_mask_size: see
            `resize_and_pad_example`.
        train_min_sizes: candidate shortest sides, one chosen uniformly.
        horizontal_flip: flip with probability 0.5.

    Returns:
        See `resize_and_pad_example`.
    """
    size_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    index = tf.random.stateless_uniform([], size_seed, 0, len(train_min_sizes), tf.int32)
    min_size = tf.gather(tf.constant(train_min_sizes, tf.float32), index)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5 if horizontal_flip else False
    return resize_and_pad_example(
        example, min_size=min_size, max_size=max_size, flip=flip, image_size=image_size,
        pixel_mean=pixel_mean, pixel_std=pixel_std, max_instances=max_instances,
        gt_mask_size=gt_mask_size, drop_invalid=True)


def preprocess_for_eval(example: Example, *, image_size: Sequence[int],
                        eval_min_size: float, max_size: float,
                        pixel_mean: Sequence[float], pixel_std: Sequence[float],
                        max_instances: int, gt_mask_size: int) -> Example:
    """Resize to `eval_min_size` and pad; keeps crowd/empty instances with gt_valid=False."""
    return resize_and_pad_example(
        example, min_size=eval_min_size, max_size=max_size, flip=False,
        image_size=image_size, pixel_mean=pixel_mean, pixel_std=pixel_std,
        max_instances=max_instances, gt_mask_size=gt_mask_size, drop_invalid=False)


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def build_train_dataset(builder: tfds.core.DatasetBuilder, *, split: str, batch_size: int,
                        seed: int, image_size: Sequence[int],
                        train_min_sizes: Sequence[int], max_size: float,
                        horizontal_flip: bool, pixel_mean: Sequence[float],
                        pixel_std: Sequence[float], max_instances: int, gt_mask_size: int,
                        shuffle_buffer_size: int = 1000, process_index: int = 0,
                        process_count: int = 1) -> tf.data.Dataset:
    """Infinite, shuffled, augmented training stream of batches.

    Deterministic given `seed` (file order, shuffle and augmentation); the iterator's state
    (including the shuffle buffer of encoded examples) can be checkpointed.

    Args:
        builder: prepared `coco_builder` dataset.
        split: split name, e.g. 'train'.
        batch_size: examples per batch on this process.
        seed: pipeline seed.
        image_size, train_min_sizes, max_size, horizontal_flip, pixel_mean, pixel_std,
            max_instances, gt_mask_size: see `preprocess_for_train`.
        shuffle_buffer_size: examples in the shuffle buffer.
        process_index: this process's index; files (or, if there are fewer files than
            processes, examples) are sharded over processes.
        process_count: number of processes.

    Returns:
        Dataset of batches (dicts of tensors with leading dimension `batch_size`).
    """
    # Files are written in image-id order (an ordered dataset); shuffling them for
    # training is intended, hence no ordering guard.
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False,
                                  enable_ordering_guard=False)
    if process_count > 1:
        if builder.info.splits[split].num_shards >= process_count:
            read_config.input_context = tf.distribute.InputContext(
                num_input_pipelines=process_count, input_pipeline_id=process_index)
        else:  # too few files to shard: split the examples instead
            split = tfds.even_splits(split, n=process_count)[process_index]
    ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config,
                            decoders=SKIP_DECODING)
    ds = ds.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True).repeat()
    base_seed = tf.constant([seed, process_index], tf.int64)

    def preprocess(index, example):
        return preprocess_for_train(
            example, seed=tf.random.experimental.stateless_fold_in(base_seed, index),
            image_size=image_size, train_min_sizes=train_min_sizes, max_size=max_size,
            horizontal_flip=horizontal_flip, pixel_mean=pixel_mean, pixel_std=pixel_std,
            max_instances=max_instances, gt_mask_size=gt_mask_size)

    ds = ds.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return _deterministic(ds.prefetch(tf.data.AUTOTUNE))


def _pad_batch(batch: Example, batch_size: int) -> Example:
    """Pads a (possibly short) batch to `batch_size`; padding has batch_mask 0."""
    return {k: _pad_to(v, batch_size) for k, v in batch.items()}


def build_eval_dataset(builder: tfds.core.DatasetBuilder, *, split: str, batch_size: int,
                       image_size: Sequence[int], eval_min_size: float, max_size: float,
                       pixel_mean: Sequence[float], pixel_std: Sequence[float],
                       max_instances: int, gt_mask_size: int, process_index: int = 0,
                       process_count: int = 1) -> tf.data.Dataset:
    """One in-order pass over `split` in batches of exactly `batch_size`.

    The last batch is padded with all-zero examples whose `batch_mask` is 0. With several
    processes each one reads a contiguous 1/process_count of the examples and all of them
    yield the same number of batches (padding batches where needed).

    Args:
        builder: prepared `coco_builder` dataset.
        split: split name, e.g. 'val'.
        batch_size: examples per batch on this process.
        image_size, eval_min_size, max_size, pixel_mean, pixel_std, max_instances,
            gt_mask_size: see `preprocess_for_eval`.
        process_index: this process's index.
        process_count: number of processes.

    Returns:
        Dataset of ceil(ceil(num_examples / process_count) / batch_size) batches.
    """
    num_examples = builder.info.splits[split].num_examples
    num_batches = math.ceil(math.ceil(num_examples / process_count) / batch_size)
    if process_count > 1:
        split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=SKIP_DECODING,
                            read_config=tfds.ReadConfig(try_autocache=False))

    def preprocess(example):
        return preprocess_for_eval(
            example, image_size=image_size, eval_min_size=eval_min_size, max_size=max_size,
            pixel_mean=pixel_mean, pixel_std=pixel_std, max_instances=max_instances,
            gt_mask_size=gt_mask_size)

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).map(lambda b: _pad_batch(b, batch_size))
    padding = tf.data.Dataset.from_tensors(
        {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()})
    ds = ds.concatenate(padding.repeat()).take(num_batches)
    return _deterministic(ds.prefetch(tf.data.AUTOTUNE))
