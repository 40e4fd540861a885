"""Checks a config before anything is built: unknown keys and impossible values
are one-line errors that name the key."""

import os

import ml_collections

from projects.maskrcnn.ops import roi_align

# Top-level keys the trainer reads (Scenic names where Scenic has one).
TOP_LEVEL_KEYS = {
    'experiment_name', 'rng_seed', 'dataset_name', 'dataset_configs', 'batch_size',
    'eval_batch_size', 'num_training_steps', 'log_summary_steps', 'log_eval_steps',
    'checkpoint_steps', 'max_checkpoints_to_keep', 'lr_configs', 'optimizer_configs',
    'model', 'dtype', 'init_from', 'eval_max_examples', 'workdir_suffix', 'shuffle_seed',
    'data_dtype_str', 'eval_only', 'skip_nonfinite_steps', 'compute_validation_loss',
    'num_eval_images_to_show',
}
LR_KEYS = {'base_learning_rate', 'warmup_steps', 'warmup_factor', 'decay_steps', 'decay_factor'}
OPTIMIZER_KEYS = {'optimizer', 'momentum', 'nesterov', 'beta1', 'beta2', 'eps', 'weight_decay',
                  'weight_decay_norm', 'grad_clip_norm', 'no_weight_decay', 'layerwise_decay',
                  'layerwise_num_layers'}
INIT_FROM_KEYS = {'checkpoint_path'}


def _check_keys(section: ml_collections.ConfigDict, allowed: set[str], prefix: str) -> None:
    for key in section:
        if key not in allowed:
            raise KeyError(f'unknown config key {prefix}{key}; known keys: '
                           f'{", ".join(sorted(allowed))}')


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises KeyError/ValueError naming the first bad key or value."""
    _check_keys(config, TOP_LEVEL_KEYS, 'config.')
    _check_keys(config.lr_configs, LR_KEYS, 'config.lr_configs.')
    _check_keys(config.optimizer_configs, OPTIMIZER_KEYS, 'config.optimizer_configs.')
    if config.get('init_from') is not None:
        _check_keys(config.init_from, INIT_FROM_KEYS, 'config.init_from.')
        path = config.init_from.get('checkpoint_path')
        if path and not os.path.exists(path):
            raise FileNotFoundError(f'config.init_from.checkpoint_path={path} does not exist')
    optimizer = config.optimizer_configs.get('optimizer', 'momentum')
    if optimizer not in ('momentum', 'adamw'):
        raise ValueError(f"config.optimizer_configs.optimizer={optimizer!r} must be 'momentum' "
                         f"or 'adamw'")
    if config.get('dtype', 'float32') not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"config.dtype={config.get('dtype')!r} must be 'float32', "
                         f"'bfloat16' or 'float16'")
    for key in ('batch_size', 'eval_batch_size'):
        value = config.get(key)
        if not isinstance(value, int) or value <= 0 or value % num_devices:
            raise ValueError(f'config.{key}={value} must be a positive multiple of the '
                             f'{num_devices} devices')
    for key in ('num_training_steps', 'log_summary_steps', 'checkpoint_steps'):
        if config.get(key) is None or config.get(key) <= 0:
            raise ValueError(f'config.{key}={config.get(key)} must be a positive integer')
    impl = config.get('model', {}).get('roi_heads', {}).get('roi_align_impl', 'auto')
    if impl not in roi_align.IMPLS:
        raise ValueError(f'config.model.roi_heads.roi_align_impl={impl!r} must be one of '
                         f'{roi_align.IMPLS}')
    image_size = config.dataset_configs.get('image_size', ())
    image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size,)
    stride = 2 ** (len(config.model.anchors.sizes) + 1) if 'model' in config else 64
    if len(image_size) != 2 or any(not isinstance(s, int) or s <= 0 or s % stride
                                   for s in image_size):
        raise ValueError(f'config.dataset_configs.image_size={image_size} must be (H, W) '
                         f'divisible by the largest FPN stride {stride}')
