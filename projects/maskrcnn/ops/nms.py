"""Non-maximum suppression on fixed shapes.

Greedy NMS keeps a box when no higher-scoring kept box overlaps it by more than
the threshold. That rule has a unique fixed point, which we reach by iterating
"keep = valid & not suppressed by kept predecessors" over the whole sorted set
at once: after k rounds the first k boxes are final, and in practice a handful of
rounds suffice. Every call is a vmap-able function of padded arrays, so all the
NMS calls of a step (images x levels, images x classes) batch into one.
"""

import jax
import jax.numpy as jnp

from projects.maskrcnn.ops import boxes as box_ops


def nms_mask(boxes: jnp.ndarray, scores: jnp.ndarray, valid: jnp.ndarray,
             iou_threshold: float) -> jnp.ndarray:
    """Which boxes greedy NMS keeps.

    Args:
      boxes: [N, 4] xyxy.
      scores: [N].
      valid: [N] bool; invalid boxes are neither kept nor suppress others.
      iou_threshold: a box is suppressed by a kept box with IoU > threshold.

    Returns:
      [N] bool keep mask, in the input order.
    """
    n = boxes.shape[0]
    order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), stable=True)
    sorted_boxes = boxes[order]
    sorted_valid = valid[order]
    overlaps = box_ops.pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold
    # suppresses[j, i]: an earlier (higher-scoring) box j can suppress box i.
    suppresses = overlaps & jnp.triu(jnp.ones((n, n), bool), k=1)

    def step(state):
        keep, _ = state
        suppressed = jnp.any(suppresses & keep[:, None], axis=0)
        new_keep = sorted_valid & ~suppressed
        return new_keep, jnp.any(new_keep != keep)

    keep, _ = jax.lax.while_loop(lambda s: s[1], step, (sorted_valid, jnp.array(True)))
    return jnp.zeros(n, bool).at[order].set(keep)


def nms_top_k(boxes: jnp.ndarray, scores: jnp.ndarray, valid: jnp.ndarray,
              iou_threshold: float, max_output: int
              ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """NMS, then the `max_output` highest-scoring kept boxes.

    Returns:
      indices [max_output] into the inputs (by decreasing score), their scores
      (-inf where empty) and a validity mask [max_output].
    """
    keep = nms_mask(boxes, scores, valid, iou_threshold)
    masked = jnp.where(keep, scores, -jnp.inf)
    k = min(max_output, boxes.shape[0])
    top_scores, top_idx = jax.lax.top_k(masked, k)
    top_valid = jnp.isfinite(top_scores)
    if k < max_output:
        pad = max_output - k
        top_idx = jnp.pad(top_idx, (0, pad))
        top_scores = jnp.pad(top_scores, (0, pad), constant_values=-jnp.inf)
        top_valid = jnp.pad(top_valid, (0, pad))
    return top_idx, top_scores, top_valid
