"""Typed settings of the detector's parts, with Detectron2's R50-FPN defaults.

These frozen dataclasses are the schema of `config.model`: model.py builds
them from the config, so a misspelt key is an error that names it.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    depth: int = 50
    width: int = 64
    norm: str = 'frozen_bn'      # 'bn' (SyncBN under jit), 'frozen_bn', 'gn', 'none'
    freeze_at: int = 2
    stride_in_1x1: bool = False  # True for MSRA/Detectron2 weights
    norm_eps: float = 1e-5       # of 'bn' and 'frozen_bn'; torchvision and Detectron2 use 1e-5


@dataclasses.dataclass(frozen=True)
class FPNSpec:
    channels: int = 256
    norm: str = 'none'


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    sizes: tuple = ((32,), (64,), (128,), (256,), (512,))  # one tuple per level P2..P6
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    offset: float = 0.0
    round_cell_anchors: bool = False  # torchvision rounds its cell anchors to integers
    order: str = 'size_major'         # cell anchors' order; torchvision's is 'ratio_major'


@dataclasses.dataclass(frozen=True)
class RPNSpec:
    num_convs: int = 1
    iou_thresholds: tuple = (0.3, 0.7)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    box_weights: tuple = (1.0, 1.0, 1.0, 1.0)
    nms_threshold: float = 0.7
    pre_nms_topk_train: int = 2000   # per level
    post_nms_topk_train: int = 1000  # per image
    pre_nms_topk_test: int = 1000
    post_nms_topk_test: int = 1000
    # Proposals keep both sides > min_box_size (Detectron2's nonempty), or
    # >= min_box_size with `min_box_size_inclusive` (torchvision: 1e-3, inclusive).
    min_box_size: float = 0.0
    min_box_size_inclusive: bool = False


@dataclasses.dataclass(frozen=True)
class ROIHeadsSpec:
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_threshold: float = 0.5
    bg_iou_low: float = 0.0          # 0.1 is the design document's Fast R-CNN option
    append_gt_boxes: bool = True
    box_resolution: int = 7
    mask_resolution: int = 14
    # Bilinear samples per bin and axis; 0 is Detectron2's adaptive
    # ceil(roi_side / bins), computed under a static cap (see ops/roi_align.py).
    sampling_ratio: int = 2
    adaptive_sampling_cap: int = 4
    aligned: bool = True
    canonical_size: float = 224.0
    canonical_level: int = 4
    level_rule: str = 'detectron2'   # or 'torchvision' (where the epsilon goes)
    # 'gather', 'matmul' (separable interpolation matrices) or 'auto' from the
    # map sizes; the same result either way (see ops/roi_align.py).
    roi_align_impl: str = 'auto'


@dataclasses.dataclass(frozen=True)
class BoxHeadSpec:
    fc_dim: int = 1024
    num_fc: int = 2
    box_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    class_agnostic: bool = False


@dataclasses.dataclass(frozen=True)
class MaskHeadSpec:
    conv_dim: int = 256
    num_convs: int = 4
    upsample: str = 'deconv'         # or 'bilinear'
    norm: str = 'none'
    num_fg_slots: int = 128          # RoIs given to the mask head in training
    targets: str = 'hard'            # or 'soft', torchvision's (see ops/targets.py)
    class_agnostic: bool = False


@dataclasses.dataclass(frozen=True)
class TestSpec:
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    # Before NMS, detections need both sides > min_box_size, or >= with
    # `min_box_size_inclusive` (torchvision: 1e-2, inclusive). The default drops
    # empty boxes only (Detectron2 drops them after the top-k instead).
    min_box_size: float = 0.0
    min_box_size_inclusive: bool = False


SPECS = {
    'backbone': BackboneSpec, 'fpn': FPNSpec, 'anchors': AnchorSpec, 'rpn': RPNSpec,
    'roi_heads': ROIHeadsSpec, 'box_head': BoxHeadSpec, 'mask_head': MaskHeadSpec,
    'test': TestSpec,
}


def _freeze(value):
    """Lists from a config become tuples, so that specs stay hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def build_spec(name: str, values: dict):
    """Builds `SPECS[name]` from a dict, naming any key it does not know."""
    cls = SPECS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise KeyError(f'unknown config key model.{name}.{key}; '
                           f'known keys: {", ".join(sorted(known))}')
    return cls(**{k: _freeze(v) for k, v in values.items()})
