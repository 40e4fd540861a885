"""tf.data pipeline from COCO-format TFDS examples to the batch of CONVENTIONS.md.

Training draws, per example, the shortest side from a list (or a large-scale-jitter scale)
and a horizontal flip, then applies `transforms.py`; crowd instances and instances without
area are dropped. Evaluation resizes to one size and keeps every instance (crowd and empty
ones with `gt_valid` False) and the image id and original size. Images and instances are
padded while batching (`padded_batch`) to the static `image_size` and `max_instances`.

Random augmentation uses stateless ops seeded per example from the pipeline seed and the
example's position in the stream, so the stream is reproducible and its position can be
checkpointed.
"""

import math
from collections.abc import Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

from projects.maskrcnn.data import transforms
from projects.maskrcnn.data.transforms import Example
# The per-example transforms lived here before transforms.py; kept importable from here.
from projects.maskrcnn.data.transforms import crop_masks  # noqa: F401
from projects.maskrcnn.data.transforms import large_scale_jitter_example  # noqa: F401
from projects.maskrcnn.data.transforms import resize_and_pad_example  # noqa: F401

# `as_dataset(decoders=SKIP_DECODING)` reads images and masks still encoded: shuffle
# buffers stay small and decoding happens in the parallel map.
SKIP_DECODING = {'image': tfds.decode.SkipDecoding(),
                  'objects': {'mask': tfds.decode.SkipDecoding()}}


def preprocess_for_train(example: Example, *, seed: tf.Tensor, image_size: Sequence[int],
                         train_min_sizes: Sequence[int], max_size: float,
                         horizontal_flip: bool, pixel_mean: Sequence[float],
                         pixel_std: Sequence[float], max_instances: int,
                         gt_mask_size: int, channel_order: str = 'RGB',
                         large_scale_jitter: bool = False,
                         lsj_scale_range: Sequence[float] = (0.1, 2.0),
                         pad: bool = True, resize_rounding: str = 'round') -> Example:
    """Random shortest side from `train_min_sizes` (or large-scale jitter) and random flip.

    Crowd instances and instances with empty boxes are dropped; the first `max_instances`
    of the others are kept.

    Args:
        example: a `coco_builder` example.
        seed: int32/int64 [2] stateless seed of this example.
        image_size, max_size, pixel_mean, pixel_std, max_instances, gt_mask_size,
            channel_order, pad, resize_rounding: see `transforms.resize_and_pad_example`.
        train_min_sizes: candidate shortest sides, one chosen uniformly (unused with
            large-scale jitter).
        horizontal_flip: flip with probability 0.5.
        large_scale_jitter: use `transforms.large_scale_jitter_example` with a scale drawn uniformly
            from `lsj_scale_range` instead of the shortest-side choice.
        lsj_scale_range: (low, high) scale relative to `image_size`.

    Returns:
        See `transforms.resize_and_pad_example`.
    """
    size_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5 if horizontal_flip else False
    common = dict(flip=flip, image_size=image_size, pixel_mean=pixel_mean,
                  pixel_std=pixel_std, channel_order=channel_order,
                  max_instances=max_instances, gt_mask_size=gt_mask_size, pad=pad,
                  resize_rounding=resize_rounding)
    if large_scale_jitter:
        low, high = lsj_scale_range
        scale_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, 2), 2))
        return transforms.large_scale_jitter_example(
            example, scale_factor=tf.random.stateless_uniform([], scale_seed, low, high),
            crop_fraction=tf.random.stateless_uniform([2], crop_seed), **common)
    index = tf.random.stateless_uniform([], size_seed, 0, len(train_min_sizes), tf.int32)
    min_size = tf.gather(tf.constant(train_min_sizes, tf.float32), index)
    return transforms.resize_and_pad_example(example, min_size=min_size, max_size=max_size,
                                  drop_invalid=True, **common)


def preprocess_for_eval(example: Example, *, image_size: Sequence[int],
                        eval_min_size: float, max_size: float,
                        pixel_mean: Sequence[float], pixel_std: Sequence[float],
                        max_instances: int, gt_mask_size: int,
                        channel_order: str = 'RGB', pad: bool = True,
                        resize_rounding: str = 'round') -> Example:
    """Resize to `eval_min_size` and pad; keeps crowd/empty instances with gt_valid=False."""
    return transforms.resize_and_pad_example(
        example, min_size=eval_min_size, max_size=max_size, flip=False,
        image_size=image_size, pixel_mean=pixel_mean, pixel_std=pixel_std,
        max_instances=max_instances, gt_mask_size=gt_mask_size, drop_invalid=False,
        channel_order=channel_order, pad=pad, resize_rounding=resize_rounding)


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
                        process_count: int = 1, channel_order: str = 'RGB',
                        large_scale_jitter: bool = False,
                        lsj_scale_range: Sequence[float] = (0.1, 2.0),
                        resize_rounding: str = 'round') -> tf.data.Dataset:
    """Infinite, shuffled, augmented training stream of batches.

    Deterministic given `seed` (file order, shuffle and augmentation); the iterator's state
    (including the shuffle buffer of encoded examples) can be checkpointed.

    Args:
        builder: prepared `coco_builder` dataset.
        split: split name, e.g. 'train'.
        batch_size: examples per batch on this process.
        seed: pipeline seed.
        image_size, train_min_sizes, max_size, horizontal_flip, pixel_mean, pixel_std,
            max_instances, gt_mask_size, channel_order, large_scale_jitter,
            lsj_scale_range, resize_rounding: see `preprocess_for_train`.
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
            max_instances=max_instances, gt_mask_size=gt_mask_size,
            channel_order=channel_order, large_scale_jitter=large_scale_jitter,
            lsj_scale_range=lsj_scale_range, pad=False, resize_rounding=resize_rounding)

    ds = ds.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
    shapes = transforms.padded_shapes(image_size, max_instances, gt_mask_size)
    ds = ds.padded_batch(batch_size, shapes, drop_remainder=True)
    return _deterministic(ds.prefetch(tf.data.AUTOTUNE))


def _pad_batch(batch: Example, batch_size: int) -> Example:
    """Pads a (possibly short) batch to `batch_size`; padding has batch_mask 0."""
    return {k: transforms.pad_to(v, batch_size) for k, v in batch.items()}


def build_eval_dataset(builder: tfds.core.DatasetBuilder, *, split: str, batch_size: int,
                       image_size: Sequence[int], eval_min_size: float, max_size: float,
                       pixel_mean: Sequence[float], pixel_std: Sequence[float],
                       max_instances: int, gt_mask_size: int, process_index: int = 0,
                       process_count: int = 1, channel_order: str = 'RGB',
                       resize_rounding: str = 'round') -> tf.data.Dataset:
    """One in-order pass over `split` in batches of exactly `batch_size`.

    The last batch is padded with all-zero examples whose `batch_mask` is 0. With several
    processes each one reads a contiguous 1/process_count of the examples and all of them
    yield the same number of batches (padding batches where needed).

    Args:
        builder: prepared `coco_builder` dataset.
        split: split name, e.g. 'val'.
        batch_size: examples per batch on this process.
        image_size, eval_min_size, max_size, pixel_mean, pixel_std, max_instances,
            gt_mask_size, channel_order, resize_rounding: see `preprocess_for_eval`.
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
            gt_mask_size=gt_mask_size, channel_order=channel_order, pad=False,
            resize_rounding=resize_rounding)

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.padded_batch(batch_size,
                         transforms.padded_shapes(image_size, max_instances, gt_mask_size))
    ds = ds.map(lambda b: _pad_batch(b, batch_size))
    padding = tf.data.Dataset.from_tensors(
        {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()})
    ds = ds.concatenate(padding.repeat()).take(num_batches)
    return _deterministic(ds.prefetch(tf.data.AUTOTUNE))
