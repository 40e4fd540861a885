"""Typed settings of the detector's parts, with Detectron2's R50-FPN defaults.

These frozen dataclasses are the schema of `config.model`: model.py builds
them from the config, so a misspelt key is an error that names it. The
backbone's and the neck's specs belong to the part the config names
(`config.model.backbone.name`, `config.model.neck.name`), see registry.py.
"""

import dataclasses

from projects.maskrcnn.modeling import registry


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
    # `num_convs` 3x3 convs of `conv_dim` channels, each with `norm`, then `num_fc`
    # fully connected layers: Detectron2's "4conv1fc" is num_convs=4, num_fc=1.
    num_convs: int = 0
    conv_dim: int = 256
    norm: str = 'none'               # of the convs: 'none', 'bn' (SyncBN under jit), 'gn', 'ln'
    fc_dim: int = 1024
    num_fc: int = 2
    box_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    class_agnostic: bool = False


@dataclasses.dataclass(frozen=True)
class MaskHeadSpec:
    conv_dim: int = 256
    num_convs: int = 4
    upsample: str = 'deconv'         # or 'bilinear'
    norm: str = 'none'               # 'none', 'bn' (SyncBN under jit), 'gn', 'ln'
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
    'anchors': AnchorSpec, 'rpn': RPNSpec, 'roi_heads': ROIHeadsSpec,
    'box_head': BoxHeadSpec, 'mask_head': MaskHeadSpec, 'test': TestSpec,
}


def build_spec(name: str, values: dict):
    """Builds `SPECS[name]` from a dict, naming any key it does not know."""
    return registry.build_dataclass(SPECS[name], values, f'model.{name}')


def __getattr__(name: str):
    """`BackboneSpec` and `FPNSpec`, the default parts' specs, for code written
    before they moved to their parts' files."""
    return registry.legacy_spec(name)
