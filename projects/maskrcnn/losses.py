"""Mask R-CNN losses, computed from the detector's training outputs.

RPN terms are divided by `batch_size_per_image * num_images` (Detectron2's
`normalizer`; `rpn_normalizer='batch_size_per_image'`) or by the number of
anchors actually sampled (torchvision's; 'sampled'); the two differ only when
an image has fewer labelled anchors than its budget. Box-head terms are divided
by the number of sampled RoIs (both references), the mask term is the mean over
foreground RoIs and pixels. Box regression uses smooth L1 with `beta` (0 gives
plain L1, Detectron2's default; torchvision's is 1/9).
"""

import jax.numpy as jnp
import optax

LOSS_TERMS = ('rpn_cls', 'rpn_box', 'roi_cls', 'roi_box', 'mask')
RPN_NORMALIZERS = ('sampled', 'batch_size_per_image')


def smooth_l1(x: jnp.ndarray, beta: float) -> jnp.ndarray:
    ax = jnp.abs(x)
    if beta <= 0:
        return ax
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def _safe_div(a, b):
    return a / jnp.maximum(b, 1.0)


def rpn_losses(out: dict, beta: float = 0.0, normalizer: str = 'sampled'
               ) -> dict[str, jnp.ndarray]:
    """Objectness BCE and box regression over the sampled anchors.

    `out['rpn_weights']` is [B, batch_size_per_image] (1 for the sampled
    slots), so 'batch_size_per_image' divides by its size."""
    if normalizer not in RPN_NORMALIZERS:
        raise ValueError(f'unknown model.rpn_loss_normalizer {normalizer!r}; '
                         f'expected one of {RPN_NORMALIZERS}')
    weights = out['rpn_weights']
    normaliser = weights.sum() if normalizer == 'sampled' else float(weights.size)
    bce = optax.sigmoid_binary_cross_entropy(out['rpn_logits'], out['rpn_labels'])
    box = smooth_l1(out['rpn_deltas'] - out['rpn_box_targets'], beta).sum(-1)
    return {
        'rpn_cls': _safe_div((bce * weights).sum(), normaliser),
        'rpn_box': _safe_div((box * out['rpn_is_positive']).sum(), normaliser),
    }


def box_head_losses(out: dict, beta: float = 0.0) -> dict[str, jnp.ndarray]:
    """Softmax cross-entropy over K + 1 classes and class-specific box regression."""
    valid = out['roi_valid'].astype(jnp.float32)
    normaliser = valid.sum()
    ce = optax.softmax_cross_entropy_with_integer_labels(out['roi_cls_logits'],
                                                         out['roi_classes'])
    box = smooth_l1(out['roi_box_deltas'] - out['roi_box_targets'], beta).sum(-1)
    return {
        'roi_cls': _safe_div((ce * valid).sum(), normaliser),
        'roi_box': _safe_div((box * out['roi_is_positive']).sum(), normaliser),
    }


def mask_loss(out: dict) -> dict[str, jnp.ndarray]:
    """Per-pixel BCE on the ground-truth class's mask, foreground RoIs only."""
    valid = out['mask_valid'].astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(out['mask_logits'], out['mask_targets'])
    per_roi = bce.mean(axis=(-2, -1))
    return {'mask': _safe_div((per_roi * valid).sum(), valid.sum())}


def total_loss(out: dict, weights: dict[str, float], rpn_beta: float = 0.0,
               roi_beta: float = 0.0, rpn_normalizer: str = 'sampled'
               ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Weighted sum of every term; returns (total, {term: unweighted value})."""
    terms = {**rpn_losses(out, rpn_beta, rpn_normalizer), **box_head_losses(out, roi_beta),
             **mask_loss(out)}
    total = sum(weights.get(name, 1.0) * value for name, value in terms.items())
    return total, terms


def count_foreground(out: dict) -> dict[str, jnp.ndarray]:
    """Sampling statistics worth watching next to the losses."""
    return {
        'num_fg_anchors': out['rpn_is_positive'].sum(-1).mean().astype(jnp.float32),
        'num_fg_rois': out['roi_is_positive'].sum(-1).mean().astype(jnp.float32),
        'num_proposals': out['num_proposals'].mean(),
        'roi_cls_accuracy': _safe_div(
            ((jnp.argmax(out['roi_cls_logits'], -1) == out['roi_classes'])
             * out['roi_valid']).sum(), out['roi_valid'].sum()),
    }


