"""Scenic-style dataset builders for Detectax: `shapes` and `coco_format`.

Each builder has Scenic's signature and returns `Dataset(train_iter, valid_iter, test_iter,
meta_data)` (Scenic's `dataset_utils.Dataset` when Scenic is installed):
  train_iter  `clu.data.TfDatasetIterator` over the infinite training stream, yielding numpy
              batches of `batch_size` examples, the per-process batch as Scenic passes it
              (CONVENTIONS.md); its
              `save(filename)` / `restore(filename)` checkpoint the data position.
  valid_iter  zero-argument callable returning a fresh iterator over one pass of the
              validation split, batches of `eval_batch_size` (per process), the last
              one padded (`batch_mask` 0).
  test_iter   None.
  meta_data   num_classes (K), category_ids (label i + 1 <-> category_ids[i]),
              category_names, input_shape (-1, H, W, 3), input_dtype, num_train_examples,
              num_eval_examples, max_instances, gt_mask_size, val_annotations_file (the
              evaluation JSON stored with the dataset, see coco_builder.py).

dataset_configs keys (any other key is a ValueError); defaults shapes / coco_format:
  data_dir             '~/tensorflow_datasets' (TFDS data directory)
  image_size           (128, 128) / (1344, 1344)   padded (H, W)
  train_min_sizes      (128,) / (640, 672, ..., 800)   shortest side, one drawn per example
  max_size             128 / 1333                   longest-side cap
  eval_min_size        128 / 800
  horizontal_flip      True
  large_scale_jitter   False    scale to lsj_scale_range x image_size, crop/pad to image_size
                                (replaces train_min_sizes/max_size in training)
  lsj_scale_range      (0.1, 2.0)
  channel_order        'RGB'    or 'BGR' (Detectron2's MSRA weights); mean/std in that order
  resize_rounding      'round'  how the resized size is made whole: 'round' (halves up, as
                                Detectron2's ResizeShortestEdge) or 'floor' (as torchvision's
                                GeneralizedRCNNTransform); set it to the weights' reference
  pixel_mean           (123.675, 116.28, 103.53)    0-255 units (torchvision's ImageNet mean;
                                                    MSRA/BGR: (103.53, 116.28, 123.675))
  pixel_std            (58.395, 57.12, 57.375)      (MSRA/BGR: (1.0, 1.0, 1.0))
  max_instances        16 / 100                     M
  gt_mask_size         28 / 112                     S
  shuffle_buffer_size  1000                         encoded examples (part of checkpoints)
shapes only (generated into data_dir/shapes_<params>/raw, then built with coco_builder):
  num_train 2000, num_val 200, shapes_image_size 128, shapes_seed 0, max_shapes 6
coco_format only:
  name 'coco2017' (TFDS name), train_annotations, train_images, val_annotations, val_images,
  skip_bad_images False.
  With the four paths (images may be folders or 'x.zip/folder') the dataset is built on first
  use into data_dir/name/<version>; without any, the dataset `name` must be prepared there
  already (`python -m projects.maskrcnn.data.build_dataset`, COCO 2017 included).
"""

import dataclasses
import os
import shutil
from typing import Any
from collections.abc import Callable

from absl import logging
import tensorflow as tf
from clu import data as clu_data

from projects.maskrcnn.data import coco_builder
from projects.maskrcnn.data import input_pipeline
from projects.maskrcnn.data import shapes

from projects.maskrcnn.scenic_compat import scenic_dataset_utils, scenic_datasets


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Same fields as Scenic's `dataset_utils.Dataset`, used when Scenic is absent."""
    train_iter: Any
    valid_iter: Any
    test_iter: Any
    meta_data: dict[str, Any]
    train_ds: tf.data.Dataset | None = None
    valid_ds: tf.data.Dataset | None = None
    test_ds: tf.data.Dataset | None = None


_COMMON_DEFAULTS = {
    'data_dir': '~/tensorflow_datasets',
    'horizontal_flip': True,
    'large_scale_jitter': False,
    'lsj_scale_range': (0.1, 2.0),
    'channel_order': 'RGB',
    # The Detectron2 rule by default: the base configs follow Detectron2's conventions.
    'resize_rounding': 'round',
    'pixel_mean': (123.675, 116.28, 103.53),
    'pixel_std': (58.395, 57.12, 57.375),
    'shuffle_buffer_size': 1000,
}
_DEFAULTS = {
    'shapes': dict(
        _COMMON_DEFAULTS, image_size=(128, 128), train_min_sizes=(128,), max_size=128,
        eval_min_size=128, max_instances=16, gt_mask_size=28, num_train=2000, num_val=200,
        shapes_image_size=128, shapes_seed=0, max_shapes=6),
    'coco_format': dict(
        _COMMON_DEFAULTS, image_size=(1344, 1344), train_min_sizes=tuple(range(640, 801, 32)),
        max_size=1333, eval_min_size=800, max_instances=100, gt_mask_size=112,
        name='coco2017', train_annotations=None, train_images=None, val_annotations=None,
        val_images=None, skip_bad_images=False),
}
_PATH_KEYS = ('train_annotations', 'train_images', 'val_annotations', 'val_images')


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# key -> number of elements (None: one or more) of the dataset_configs sequences.
_SEQUENCES = {'image_size': 2, 'train_min_sizes': None, 'pixel_mean': 3, 'pixel_std': 3,
              'lsj_scale_range': 2}


def _check_values(cfg: dict[str, Any]) -> None:
    """Raises ValueError naming the first dataset_configs key with an impossible value."""
    for key, length in _SEQUENCES.items():
        value = cfg[key]
        ok = isinstance(value, (list, tuple)) and (len(value) == length if length else value)
        if not ok or not all(isinstance(v, (int, float)) for v in value):
            shape = {2: '(a, b)', 3: '(a, b, c)', None: '(a, ...)'}[length]
            raise ValueError(f'dataset_configs.{key}={value!r} must be {shape} numbers, e.g. '
                             f'--config.dataset_configs.{key}="{_example(key)}".')
    for key in ('image_size', 'train_min_sizes', 'pixel_std'):
        if not all(_positive(v) for v in cfg[key]):
            raise ValueError(f'dataset_configs.{key}={cfg[key]!r} must be positive.')
    for key in ('max_size', 'eval_min_size', 'max_instances', 'gt_mask_size',
                'shuffle_buffer_size'):
        if not _positive(cfg[key]):
            raise ValueError(f'dataset_configs.{key}={cfg[key]!r} must be a positive number.')


def _example(key: str) -> str:
    return {'image_size': '(1024, 1024)', 'train_min_sizes': '(640, 800)',
            'pixel_mean': '(123.675, 116.28, 103.53)', 'pixel_std': '(58.395, 57.12, 57.375)',
            'lsj_scale_range': '(0.1, 2.0)'}[key]


def _read_configs(dataset_name: str, dataset_configs: Any) -> dict[str, Any]:
    """dataset_configs (dict or ConfigDict, may be None) merged over the defaults."""
    defaults = _DEFAULTS[dataset_name]
    given = dict(dataset_configs.items()) if dataset_configs is not None else {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f'Unknown dataset_configs key(s) {unknown} for dataset '
                         f'{dataset_name!r}; allowed: {sorted(defaults)}.')
    cfg = {k: given.get(k, v) for k, v in defaults.items()}
    missing = sorted(k for k, v in cfg.items() if v is None)
    if dataset_name == 'coco_format' and set(missing) == set(_PATH_KEYS):
        missing = []  # no paths: a dataset prepared under `name`
    if missing:
        raise ValueError(f'dataset_configs needs {missing} for dataset {dataset_name!r}.')
    _check_values(cfg)
    for key in ('image_size', 'train_min_sizes', 'pixel_mean', 'pixel_std', 'lsj_scale_range'):
        cfg[key] = tuple(cfg[key])
    low, high = cfg['lsj_scale_range']
    if not 0 < low <= high:
        raise ValueError(f"dataset_configs.lsj_scale_range={cfg['lsj_scale_range']} must be "
                         f"(low, high) with 0 < low <= high.")
    if cfg['channel_order'] not in ('RGB', 'BGR'):
        raise ValueError(f"dataset_configs.channel_order must be 'RGB' or 'BGR', got "
                         f"{cfg['channel_order']!r}.")
    if cfg['resize_rounding'] not in ('floor', 'round'):
        raise ValueError(f"dataset_configs.resize_rounding must be 'floor' or 'round', got "
                         f"{cfg['resize_rounding']!r}.")
    cfg['data_dir'] = os.path.expanduser(cfg['data_dir'])
    return cfg


def _build_dataset(builder: Any, val_annotations_file: str | None, cfg: dict[str, Any], *,
                   batch_size: int, eval_batch_size: int, num_shards: int, dtype_str: str,
                   shuffle_seed: int) -> Any:
    """Train and eval pipelines plus meta_data for a prepared coco_builder dataset."""
    import jax  # only for the process layout  # pylint: disable=g-import-not-at-top

    count, index = jax.process_count(), jax.process_index()
    if shuffle_seed is None:  # Scenic passes config.get('shuffle_seed'), often unset
        shuffle_seed = 0
    # As in Scenic, batch sizes given to a builder are per process already.
    for what, size in (('batch_size', batch_size), ('eval_batch_size', eval_batch_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f'{what}={size!r} (per process) must be a positive integer.')
        if size % num_shards:
            raise ValueError(f'{what}={size} (per process) is not divisible by the '
                             f'{num_shards} local devices.')
    for split in ('train', 'val'):
        if split not in builder.info.splits:
            raise ValueError(f'Dataset {builder.name} in {builder.data_dir} has no {split!r} '
                             f'split (it has {sorted(builder.info.splits)}); rebuild it with '
                             f'both (build_dataset --val_annotations=... --val_images=...).')
    common = dict(image_size=cfg['image_size'], max_size=cfg['max_size'],
                  pixel_mean=cfg['pixel_mean'], pixel_std=cfg['pixel_std'],
                  channel_order=cfg['channel_order'], resize_rounding=cfg['resize_rounding'],
                  max_instances=cfg['max_instances'],
                  gt_mask_size=cfg['gt_mask_size'], process_index=index, process_count=count)
    train_ds = input_pipeline.build_train_dataset(
        builder, split='train', batch_size=batch_size, seed=shuffle_seed,
        train_min_sizes=cfg['train_min_sizes'], horizontal_flip=cfg['horizontal_flip'],
        large_scale_jitter=cfg['large_scale_jitter'], lsj_scale_range=cfg['lsj_scale_range'],
        shuffle_buffer_size=cfg['shuffle_buffer_size'], **common)
    valid_ds = input_pipeline.build_eval_dataset(
        builder, split='val', batch_size=eval_batch_size,
        eval_min_size=cfg['eval_min_size'], **common)
    dtype = tf.dtypes.as_dtype(dtype_str)
    if dtype != tf.float32:
        cast = lambda b: {**b, 'image': tf.cast(b['image'], dtype)}  # noqa: E731
        train_ds, valid_ds = train_ds.map(cast), valid_ds.map(cast)

    val_annotations_file = (coco_builder.eval_annotations_file(builder, 'val') or
                            val_annotations_file)
    if val_annotations_file is None:
        raise ValueError(f'Dataset {builder.name} in {builder.data_dir} stores no evaluation '
                         f'JSON (built before version {coco_builder.VERSION}): rebuild it, or '
                         f'give dataset_configs.val_annotations and the other paths.')
    category_ids, category_names = coco_builder.category_metadata(builder)
    if index == 0:
        _warn_truncation(builder, cfg['max_instances'])
    height, width = cfg['image_size']
    meta_data = {
        'num_classes': len(category_ids),
        'category_ids': category_ids,
        'category_names': category_names,
        'input_shape': (-1, height, width, 3),
        'input_dtype': dtype.as_numpy_dtype,
        'num_train_examples': builder.info.splits['train'].num_examples,
        'num_eval_examples': builder.info.splits['val'].num_examples,
        'max_instances': cfg['max_instances'],
        'gt_mask_size': cfg['gt_mask_size'],
        # The eval images' normalisation, to draw them (TensorBoard images, predict).
        'pixel_mean': cfg['pixel_mean'],
        'pixel_std': cfg['pixel_std'],
        'channel_order': cfg['channel_order'],
        'val_annotations_file': val_annotations_file,
    }
    train_iter = clu_data.TfDatasetIterator(train_ds, checkpoint=True)
    valid_iter = valid_ds.as_numpy_iterator
    if scenic_dataset_utils is not None:
        return scenic_dataset_utils.Dataset(train_iter, valid_iter, None, meta_data)
    return Dataset(train_iter, valid_iter, None, meta_data, train_ds=train_ds,
                   valid_ds=valid_ds)


def _warn_truncation(builder: Any, max_instances: int) -> None:
    """Warns once when the build report shows images with more than `max_instances`
    instances: training keeps the first ones (`train/truncated_instances` counts the rest)."""
    for split, report in coco_builder.build_report(builder).items():
        images, instances = report.beyond(max_instances)
        if images:
            effect = ('left out of training in each epoch (train/truncated_instances counts '
                      'them per step)' if split == 'train' else
                      'left out of the validation loss (AP reads the evaluation JSON and '
                      'keeps them)')
            logging.warning(
                'Split %r of %s has %d images with more than dataset_configs.max_instances=%d '
                'instances (at most %d in one image): %d instances are %s; raise '
                'dataset_configs.max_instances to keep them.', split, builder.name, images,
                max_instances, max(report.instances_per_image), instances, effect)


def _check_unsupported(dataset_service_address: str | None) -> None:
    if dataset_service_address is not None:
        raise NotImplementedError('tf.data service is not supported by Detectax datasets.')


def _shapes_raw_files(cfg: dict[str, Any]) -> tuple[str, dict[str, tuple[str, str]]]:
    """Generates the shapes COCO files once; returns (TFDS name, split files)."""
    name = (f"shapes_n{cfg['num_train']}_v{cfg['num_val']}_s{cfg['shapes_image_size']}"
            f"_m{cfg['max_shapes']}_seed{cfg['shapes_seed']}")
    raw_dir = os.path.join(cfg['data_dir'], name, 'raw')
    splits = {split: (os.path.join(raw_dir, 'annotations', f'instances_{split}.json'),
                      os.path.join(raw_dir, split)) for split in ('train', 'val')}
    if not all(os.path.exists(json_path) for json_path, _ in splits.values()):
        # Generate aside and rename, so an interrupted run never leaves a partial raw/.
        tmp_dir = f'{raw_dir}.tmp-{os.getpid()}'
        shapes.generate_shapes_coco(
            tmp_dir, num_train=cfg['num_train'], num_val=cfg['num_val'],
            image_size=cfg['shapes_image_size'], seed=cfg['shapes_seed'],
            max_shapes=cfg['max_shapes'])
        if os.path.exists(raw_dir):
            shutil.rmtree(raw_dir)  # left incomplete by an older version
        os.rename(tmp_dir, raw_dir)
    return name, splits


def get_shapes_dataset(*, batch_size: int, eval_batch_size: int, num_shards: int,
                       dtype_str: str = 'float32', shuffle_seed: int = 0, rng: Any = None,
                       dataset_configs: Any = None,
                       dataset_service_address: str | None = None) -> Any:
    """The procedural shapes dataset (see the module docstring for dataset_configs)."""
    del rng  # randomness comes from shuffle_seed
    _check_unsupported(dataset_service_address)
    cfg = _read_configs('shapes', dataset_configs)
    name, splits = _shapes_raw_files(cfg)
    builder = coco_builder.build_coco_format_dataset(name, splits, cfg['data_dir'])
    return _build_dataset(builder, splits['val'][0], cfg, batch_size=batch_size,
                          eval_batch_size=eval_batch_size, num_shards=num_shards,
                          dtype_str=dtype_str, shuffle_seed=shuffle_seed)


def get_coco_format_dataset(*, batch_size: int, eval_batch_size: int, num_shards: int,
                            dtype_str: str = 'float32', shuffle_seed: int = 0,
                            rng: Any = None, dataset_configs: Any = None,
                            dataset_service_address: str | None = None) -> Any:
    """Any COCO-format dataset with 'train' and 'val' splits, e.g. COCO 2017."""
    del rng  # randomness comes from shuffle_seed
    _check_unsupported(dataset_service_address)
    cfg = _read_configs('coco_format', dataset_configs)
    if cfg['train_annotations'] is None:
        builder = coco_builder.load_coco_format_dataset(cfg['name'], cfg['data_dir'])
    else:
        splits = {'train': (cfg['train_annotations'], cfg['train_images']),
                  'val': (cfg['val_annotations'], cfg['val_images'])}
        builder = coco_builder.build_coco_format_dataset(
            cfg['name'], splits, cfg['data_dir'], skip_bad_images=cfg['skip_bad_images'])
    return _build_dataset(builder, cfg['val_annotations'], cfg, batch_size=batch_size,
                          eval_batch_size=eval_batch_size, num_shards=num_shards,
                          dtype_str=dtype_str, shuffle_seed=shuffle_seed)


DATASETS: dict[str, Callable[..., Any]] = {
    'shapes': get_shapes_dataset,
    'coco_format': get_coco_format_dataset,
}


def get_dataset_builder(name: str) -> Callable[..., Any]:
    """The builder function registered as `name`."""
    if name not in DATASETS:
        raise ValueError(f'Unknown dataset {name!r}; known datasets: {sorted(DATASETS)}.')
    return DATASETS[name]


def get_dataset(dataset_name: str, *, batch_size: int, eval_batch_size: int,
                num_shards: int, dtype_str: str = 'float32', shuffle_seed: int = 0,
                rng: Any = None, dataset_configs: Any = None,
                dataset_service_address: str | None = None) -> Any:
    """Builds dataset `dataset_name` (see `DATASETS`) with Scenic's arguments."""
    return get_dataset_builder(dataset_name)(
        batch_size=batch_size, eval_batch_size=eval_batch_size, num_shards=num_shards,
        dtype_str=dtype_str, shuffle_seed=shuffle_seed, rng=rng,
        dataset_configs=dataset_configs, dataset_service_address=dataset_service_address)


if scenic_datasets is not None:
    for _name, _fn in DATASETS.items():
        try:
            scenic_datasets.add_dataset(_name)(_fn)
        except KeyError:  # already registered, e.g. on module reload
            pass


def get_dataset_from_config(config: Any, data_rng: Any) -> Any:
    """Builds `config.dataset_name` the way Scenic's `train_utils.get_dataset` does:
    per-process batch sizes, `num_shards` = local devices."""
    import jax  # pylint: disable=g-import-not-at-top
    for key in ('batch_size', 'eval_batch_size'):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f'config.{key}={value!r} must be a positive integer (a multiple '
                             f'of the {jax.device_count()} devices).')
        if config[key] % jax.device_count():
            raise ValueError(f'config.{key}={config[key]} is not divisible by the '
                             f'{jax.device_count()} devices')
    return get_dataset(
        config.dataset_name, batch_size=config.batch_size // jax.process_count(),
        eval_batch_size=config.eval_batch_size // jax.process_count(),
        num_shards=jax.local_device_count(), dtype_str=config.get('data_dtype_str', 'float32'),
        shuffle_seed=config.get('shuffle_seed', config.rng_seed), rng=data_rng,
        dataset_configs=config.get('dataset_configs'))
