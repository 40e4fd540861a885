"""Demo: Mask R-CNN trained from scratch on the embedded procedural shapes dataset.

  python projects/maskrcnn/main.py --config=configs/demo_shapes.py --workdir=/tmp/detectax_demo

Generates the dataset (nothing is downloaded), trains a small ResNet-18-FPN with
GroupNorm and evaluates COCO box and mask AP on the validation split.
Expected: see README.md (measured time and mask AP on a 2-core CPU).

  python projects/maskrcnn/main.py --config=configs/demo_shapes.py:NAME --workdir=...

trains the same model on the COCO-format dataset NAME prepared with
`python -m projects.maskrcnn.data.build_dataset --name=NAME ...` (the demo's 128-pixel
sizes stay: override dataset_configs.image_size and the others for larger images).
"""

from configs import base


_SHAPES_ONLY = ('num_train', 'num_val', 'shapes_image_size', 'shapes_seed', 'max_shapes')


def get_config(dataset: str = ''):
    """The demo config; `dataset` (after ':' in --config) names a prepared dataset."""
    config = base.get_config()
    config.experiment_name = 'demo_shapes'
    config.dataset_name = 'shapes'
    d = config.dataset_configs
    d.image_size = (128, 128)
    d.train_min_sizes = (128,)
    d.max_size = 128
    d.eval_min_size = 128
    d.gt_mask_size = 28
    d.max_instances = 8
    d.num_train = 2000
    d.num_val = 200
    d.shapes_image_size = 128
    d.shapes_seed = 0
    d.max_shapes = 6
    if dataset:
        config.experiment_name = f'demo_{dataset}'
        config.dataset_name = 'coco_format'
        for key in _SHAPES_ONLY:
            del d[key]
        d.name = dataset

    m = config.model
    m.backbone.depth = 18
    m.backbone.width = 16
    m.backbone.norm = 'gn'
    m.backbone.freeze_at = 0
    m.neck.channels = 64
    m.anchors.sizes = ((16,), (32,), (64,), (128,), (256,))
    m.rpn.pre_nms_topk_train = 600
    m.rpn.post_nms_topk_train = 256
    m.rpn.pre_nms_topk_test = 300
    m.rpn.post_nms_topk_test = 100
    m.roi_heads.batch_size_per_image = 64   # 16 foreground at most
    m.roi_heads.canonical_size = 56.0   # level rule scaled to the small images
    m.box_head.fc_dim = 256
    m.mask_head.conv_dim = 32
    m.mask_head.num_fg_slots = 8   # a random 8 of them train the mask head (README)
    m.test.detections_per_image = 20

    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_training_steps = 1100  # about 8 minutes in all on 2 CPU cores (README)
    config.log_summary_steps = 50
    config.log_eval_steps = 1100      # one evaluation, at the end
    config.compute_validation_loss = False   # its extra compilation costs 30 s of the 10 minutes
    config.checkpoint_steps = 250
    config.optimizer_configs.grad_clip_norm = 10.0
    config.lr_configs.base_learning_rate = 0.04   # 0.02 gave mask AP 40.5 at 850 steps (README)
    config.lr_configs.warmup_steps = 100
    config.lr_configs.decay_steps = (840, 1010)
    return config
