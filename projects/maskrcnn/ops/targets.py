"""Training targets for the RPN, the box head and the mask head (one image).

Pure functions of padded arrays; the detector vmaps them over the batch.
Follows Detectron2's RPN and StandardROIHeads target assignment.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from projects.maskrcnn.ops import boxes as box_ops
from projects.maskrcnn.ops import roi_align
from projects.maskrcnn.ops.matching import MatchLabel, match, sample_balanced


def rpn_targets(rng: jax.Array, anchors: jnp.ndarray, gt_boxes: jnp.ndarray,
                gt_valid: jnp.ndarray, *, iou_thresholds: Sequence[float],
                batch_size_per_image: int, positive_fraction: float,
                box_weights: Sequence[float]) -> dict[str, jnp.ndarray]:
    """Samples anchors and computes their objectness and box targets.

    Args:
      rng: PRNG key for sampling.
      anchors: [A, 4]. gt_boxes: [M, 4]. gt_valid: [M] bool.
      iou_thresholds: (negative_below, positive_from), e.g. (0.3, 0.7).

    Returns:
      dict with `indices` [S] anchor indices, `labels` [S] float objectness
      target, `weights` [S] (1 for sampled slots), `is_positive` [S],
      `box_targets` [S, 4] encoded deltas.
    """
    iou = box_ops.pairwise_iou(gt_boxes, anchors)
    matched_idx, labels = match(
        iou, gt_valid, iou_thresholds,
        (MatchLabel.NEGATIVE, MatchLabel.IGNORE, MatchLabel.POSITIVE),
        allow_low_quality_matches=True)
    idx, is_pos, valid = sample_balanced(rng, labels, batch_size_per_image,
                                         positive_fraction)
    matched = gt_boxes[matched_idx[idx]]
    return {
        'indices': idx,
        'labels': is_pos.astype(jnp.float32),
        'weights': valid.astype(jnp.float32),
        'is_positive': is_pos & valid,
        'box_targets': box_ops.encode_boxes(matched, anchors[idx], box_weights),
    }


def roi_targets(rng: jax.Array, proposals: jnp.ndarray, proposals_valid: jnp.ndarray,
                gt_boxes: jnp.ndarray, gt_classes: jnp.ndarray, gt_valid: jnp.ndarray,
                *, fg_iou_threshold: float, bg_iou_low: float,
                batch_size_per_image: int, positive_fraction: float,
                append_gt_boxes: bool) -> dict[str, jnp.ndarray]:
    """Samples RoIs among proposals (plus ground truth) and labels them.

    Args:
      proposals: [P, 4], proposals_valid: [P] bool.
      gt_boxes: [M, 4], gt_classes: [M] in 1..K, gt_valid: [M] bool.
      fg_iou_threshold: IoU from which an RoI is foreground (0.5).
      bg_iou_low: IoU below which an RoI is neither fore- nor background
        (0.0 in Detectron2; 0.1 in the original Fast R-CNN recipe).

    Returns:
      dict with `boxes` [S, 4] sampled RoIs, `valid` [S], `classes` [S] target
      class (0 for background), `is_positive` [S], `matched_gt` [S] index into
      the ground truth.
    """
    if append_gt_boxes:
        proposals = jnp.concatenate([proposals, gt_boxes], axis=0)
        proposals_valid = jnp.concatenate([proposals_valid, gt_valid], axis=0)
    iou = box_ops.pairwise_iou(gt_boxes, proposals)
    if bg_iou_low > 0:
        thresholds = (bg_iou_low, fg_iou_threshold)
        labels = (MatchLabel.IGNORE, MatchLabel.NEGATIVE, MatchLabel.POSITIVE)
    else:
        thresholds = (fg_iou_threshold,)
        labels = (MatchLabel.NEGATIVE, MatchLabel.POSITIVE)
    matched_idx, match_labels = match(iou, gt_valid, thresholds, labels,
                                      allow_low_quality_matches=False)
    idx, is_pos, valid = sample_balanced(rng, match_labels, batch_size_per_image,
                                         positive_fraction, valid=proposals_valid)
    matched_gt = matched_idx[idx]
    is_pos = is_pos & valid
    return {
        'boxes': proposals[idx],
        'valid': valid,
        'classes': jnp.where(is_pos, gt_classes[matched_gt], 0).astype(jnp.int32),
        'is_positive': is_pos,
        'matched_gt': matched_gt,
    }


def select_foreground(roi: dict[str, jnp.ndarray], num_slots: int
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Up to `num_slots` positive RoIs, for the mask head.

    The sampler puts positives first, so these are the first slots. With the
    default 512 x 0.25 = 128 positives at most, 128 slots keep every one of them.

    Returns:
      indices [num_slots] into the sampled RoIs and a validity mask.
    """
    order = jnp.argsort(~roi['is_positive'], stable=True)[:num_slots]
    return order, roi['is_positive'][order]


MASK_TARGET_MODES = ('hard', 'soft')
SOFT_TARGET_SAMPLES = 3   # per target pixel and axis, in 'soft' mode


def mask_targets(gt_masks: jnp.ndarray, gt_boxes: jnp.ndarray, matched_gt: jnp.ndarray,
                 roi_boxes: jnp.ndarray, mask_size: int, mode: str = 'hard') -> jnp.ndarray:
    """Mask targets of RoIs: each matched ground-truth mask read at the RoI box.

    'hard' (Detectron2's and tensorflow/tpu's convention): one bilinear sample
    at each target pixel's centre, thresholded at 0.5. 'soft' (torchvision's
    `project_masks_on_boxes`, approximated from the crops): the box read as
    torchvision's aligned=False RoIAlign reads it, half a pixel down and right,
    SOFT_TARGET_SAMPLES**2 samples averaged per target pixel, not thresholded.

    Args:
      gt_masks: [M, S, S] crops of the ground-truth masks to their boxes.
      gt_boxes: [M, 4]. matched_gt: [R] indices. roi_boxes: [R, 4].
      mode: 'hard' or 'soft'.

    Returns:
      [R, mask_size, mask_size] float32, in {0, 1} ('hard') or [0, 1] ('soft').
    """
    if mode not in MASK_TARGET_MODES:
        raise ValueError(f'unknown mask target mode {mode!r} (model.mask_head.targets); '
                         f'expected one of {MASK_TARGET_MODES}')
    masks, boxes = gt_masks[matched_gt], gt_boxes[matched_gt]
    if mode == 'hard':
        crops = roi_align.crop_and_resize_masks(masks, boxes, roi_boxes, mask_size)
        return (crops >= 0.5).astype(jnp.float32)
    # aligned=False puts pixel k's centre at k, where the crops put it at k + 0.5.
    n = SOFT_TARGET_SAMPLES
    crops = roi_align.crop_and_resize_masks(masks, boxes, roi_boxes + 0.5, mask_size * n)
    r = crops.shape[0]
    return crops.reshape(r, mask_size, n, mask_size, n).mean(axis=(2, 4))
