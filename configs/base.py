"""Base config: Mask R-CNN R50-FPN with Detectron2's 1x recipe (batch 16, 90k steps).

Every other config imports this one and overrides a few fields; see
demo_shapes.py. Not meant to be run directly: it names no dataset files.
"""

import ml_collections

from projects.maskrcnn.model import default_model_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment_name = 'maskrcnn_r50_fpn'
    config.rng_seed = 0
    config.dtype = 'float32'
    config.data_dtype_str = 'float32'  # Scenic's name for the input dtype

    config.dataset_name = 'coco_format'
    config.dataset_configs = ml_collections.ConfigDict()
    config.dataset_configs.data_dir = '~/tensorflow_datasets'
    config.dataset_configs.image_size = (1344, 1344)  # static pad size, divisible by 64
    config.dataset_configs.train_min_sizes = (640, 672, 704, 736, 768, 800)
    config.dataset_configs.max_size = 1333
    config.dataset_configs.eval_min_size = 800
    config.dataset_configs.horizontal_flip = True
    # Large-scale jitter instead of the shortest-side choice (see the LSJ config).
    config.dataset_configs.large_scale_jitter = False
    config.dataset_configs.lsj_scale_range = (0.1, 2.0)
    # 'BGR' for Detectron2's MSRA weights (mean/std then given in BGR order).
    config.dataset_configs.channel_order = 'RGB'
    # Resized size made whole as Detectron2 does (int(x + 0.5)), whose conventions the
    # base follows; 'floor' for torchvision's weights (its GeneralizedRCNNTransform).
    config.dataset_configs.resize_rounding = 'round'
    # torchvision's ImageNet statistics in 0-255 RGB units.
    config.dataset_configs.pixel_mean = (123.675, 116.28, 103.53)
    config.dataset_configs.pixel_std = (58.395, 57.12, 57.375)
    config.dataset_configs.max_instances = 100
    config.dataset_configs.gt_mask_size = 112

    config.model = default_model_config()

    config.batch_size = 16
    config.eval_batch_size = 8
    config.num_training_steps = 90_000
    config.log_summary_steps = 20
    config.log_eval_steps = 10_000
    config.checkpoint_steps = 5_000
    config.max_checkpoints_to_keep = 3

    config.optimizer_configs = ml_collections.ConfigDict()
    config.optimizer_configs.optimizer = 'momentum'   # or 'adamw'
    config.optimizer_configs.momentum = 0.9
    config.optimizer_configs.weight_decay = 1e-4
    config.optimizer_configs.weight_decay_norm = 0.0
    config.optimizer_configs.grad_clip_norm = None

    config.lr_configs = ml_collections.ConfigDict()
    config.lr_configs.base_learning_rate = 0.02  # at batch 16; scale linearly
    config.lr_configs.warmup_steps = 1000
    config.lr_configs.warmup_factor = 0.001
    config.lr_configs.decay_steps = (60_000, 80_000)
    config.lr_configs.decay_factor = 0.1

    config.init_from = ml_collections.ConfigDict()
    config.init_from.checkpoint_path = ml_collections.config_dict.placeholder(str)
    config.eval_max_examples = ml_collections.config_dict.placeholder(int)  # None: all
    config.eval_only = False             # restore, evaluate once, exit
    config.compute_validation_loss = True  # valid/total_loss next to the AP scalars
    config.skip_nonfinite_steps = False  # True: skip and count non-finite steps
                                         # instead of stopping with an error
    return config
