"""Matching anchors or RoIs to ground truth, and balanced sampling, on fixed shapes.

Follows Detectron2's Matcher and subsample_labels, written for padded arrays:
a sampler returns a fixed number of indices plus a validity mask instead of a
variable-length list.
"""

import enum
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp


class MatchLabel(enum.IntEnum):
    IGNORE = -1
    NEGATIVE = 0
    POSITIVE = 1


def match(iou: jnp.ndarray, gt_valid: jnp.ndarray, thresholds: Sequence[float],
          labels: Sequence[int], allow_low_quality_matches: bool
          ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Assigns each prediction to its best ground truth.

    Args:
      iou: [M, N] IoU between M ground-truth boxes and N predicted boxes.
      gt_valid: [M] bool, False for padding ground truth.
      thresholds: increasing IoU thresholds that split [0, 1] into
        len(thresholds) + 1 intervals, e.g. (0.3, 0.7).
      labels: one `MatchLabel` per interval, e.g. (NEGATIVE, IGNORE, POSITIVE).
      allow_low_quality_matches: also mark POSITIVE the predictions that have
        the highest IoU with some ground truth (ties included), as Faster R-CNN's
        RPN does so that every object gets at least one anchor.

    Returns:
      matched_idx: [N] int32 index of the best ground truth (0 if none valid).
      match_labels: [N] int32 `MatchLabel`.
    """
    if len(labels) != len(thresholds) + 1:
        raise ValueError(f'need {len(thresholds) + 1} labels for thresholds '
                         f'{tuple(thresholds)}, got {tuple(labels)}')
    iou = jnp.where(gt_valid[:, None], iou, -1.0)
    # Every reduction over the ground truth (axis 0) is a running elementwise
    # chain over its rows: fused with the IoU that feeds it, XLA:CPU runs a
    # reduction over a leading axis one scalar at a time, on one thread (73 ms
    # for the RPN's 100 x 65472 at 512x512 in the bfloat16 training step, against
    # two fusions of about 10 ms for the chain; benchmarks/profile_step --by=op).
    # Ties go to the first ground truth, as argmax.
    rows = list(iou)
    matched_vals = rows[0]
    matched_idx = jnp.zeros(iou.shape[1:], jnp.int32)
    for m, row in enumerate(rows[1:], start=1):
        better = row > matched_vals
        matched_vals = jnp.where(better, row, matched_vals)
        matched_idx = jnp.where(better, m, matched_idx)
    bounds = jnp.asarray(thresholds, jnp.float32)
    interval = jnp.searchsorted(bounds, matched_vals, side='right')
    match_labels = jnp.asarray(labels, jnp.int32)[interval]
    if allow_low_quality_matches:
        best_per_gt = jnp.max(iou, axis=1)
        # A ground truth with no overlap at all gets no anchor (as Detectron2).
        eligible = gt_valid & (best_per_gt > 0)
        is_best = functools.reduce(jnp.logical_or, [
            (row == best) & ok for row, best, ok in zip(rows, best_per_gt, eligible)])
        match_labels = jnp.where(is_best, int(MatchLabel.POSITIVE), match_labels)
    any_valid = jnp.any(gt_valid)
    match_labels = jnp.where(any_valid, match_labels, int(MatchLabel.NEGATIVE))
    return matched_idx, match_labels


def sample_balanced(rng: jax.Array, match_labels: jnp.ndarray, num_samples: int,
                    positive_fraction: float, valid: jnp.ndarray | None = None
                    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Draws up to `num_samples` entries, at most a `positive_fraction` positive.

    Negatives fill the slots that positives leave free. Draws are uniform without
    replacement among eligible entries.

    Args:
      rng: PRNG key.
      match_labels: [N] `MatchLabel` values.
      num_samples: S, the static number of slots.
      positive_fraction: the largest fraction of slots given to positives.
      valid: optional [N] bool; invalid entries are never drawn.

    Returns:
      indices: [S] int32 into the N entries (arbitrary where not valid).
      is_positive: [S] bool.
      sample_valid: [S] bool, False for slots left empty.
    """
    n = match_labels.shape[0]
    k = min(num_samples, n)
    if valid is None:
        valid = jnp.ones_like(match_labels, dtype=bool)
    pos = (match_labels == MatchLabel.POSITIVE) & valid
    neg = (match_labels == MatchLabel.NEGATIVE) & valid
    noise = jax.random.uniform(rng, (n,))
    _, pos_idx = jax.lax.top_k(jnp.where(pos, noise, -1.0), k)
    _, neg_idx = jax.lax.top_k(jnp.where(neg, noise, -1.0), k)
    num_pos = jnp.minimum(jnp.sum(pos), int(num_samples * positive_fraction))
    num_neg = jnp.minimum(jnp.sum(neg), num_samples - num_pos)
    slot = jnp.arange(num_samples)
    from_neg = jnp.clip(slot - num_pos, 0, k - 1)
    indices = jnp.where(slot < num_pos, pos_idx[jnp.minimum(slot, k - 1)],
                        neg_idx[from_neg])
    return (indices.astype(jnp.int32), slot < num_pos, slot < num_pos + num_neg)
