"""Pure box arithmetic on padded arrays: areas, IoU, encode/decode, clipping.

All boxes are `xyxy` in pixels. Every function works on arrays with any number
of leading dimensions and is meant to run in float32.
"""

import math

import jax.numpy as jnp

# Detectron2 and torchvision clamp dw, dh before exp() so that a wild prediction
# cannot overflow; boxes never grow more than 1000/16 = 62.5 times.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Area of [..., 4] xyxy boxes; zero for degenerate boxes."""
    w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return w * h


def pairwise_iou(boxes_a: jnp.ndarray, boxes_b: jnp.ndarray) -> jnp.ndarray:
    """IoU between every box of `boxes_a` [N, 4] and every box of `boxes_b` [M, 4].

    Returns:
      [N, M] IoU; 0 where the union is empty.
    """
    area_a = box_area(boxes_a)
    area_b = box_area(boxes_b)
    top_left = jnp.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = jnp.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    wh = jnp.maximum(bottom_right - top_left, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def _centers_and_sizes(boxes):
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    return ctr_x, ctr_y, widths, heights


def encode_boxes(target_boxes: jnp.ndarray, reference_boxes: jnp.ndarray,
                 weights=(1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
    """Regression deltas (dx, dy, dw, dh) that turn reference boxes into targets.

    Follows the R-CNN parameterisation used by Detectron2's Box2BoxTransform.

    Args:
      target_boxes: [..., 4] xyxy.
      reference_boxes: [..., 4] xyxy (anchors or proposals), positive sizes.
      weights: (wx, wy, ww, wh) multipliers of the deltas.

    Returns:
      [..., 4] deltas.
    """
    wx, wy, ww, wh = weights
    rx, ry, rw, rh = _centers_and_sizes(reference_boxes)
    tx, ty, tw, th = _centers_and_sizes(target_boxes)
    # Padding boxes have zero size: keep the log finite, the loss masks them.
    rw = jnp.maximum(rw, 1e-6)
    rh = jnp.maximum(rh, 1e-6)
    tw = jnp.maximum(tw, 1e-6)
    th = jnp.maximum(th, 1e-6)
    return jnp.stack([
        wx * (tx - rx) / rw,
        wy * (ty - ry) / rh,
        ww * jnp.log(tw / rw),
        wh * jnp.log(th / rh),
    ], axis=-1)


def decode_boxes(deltas: jnp.ndarray, reference_boxes: jnp.ndarray,
                 weights=(1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> jnp.ndarray:
    """Inverse of `encode_boxes`: applies [..., 4] deltas to reference boxes."""
    wx, wy, ww, wh = weights
    rx, ry, rw, rh = _centers_and_sizes(reference_boxes)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
    cx = dx * rw + rx
    cy = dy * rh + ry
    w = jnp.exp(dw) * rw
    h = jnp.exp(dh) * rh
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h],
                     axis=-1)


def clip_boxes(boxes: jnp.ndarray, image_size_hw: jnp.ndarray) -> jnp.ndarray:
    """Clips [..., 4] boxes to an image of size `image_size_hw` (..., 2) = (h, w)."""
    image_size_hw = jnp.asarray(image_size_hw, boxes.dtype)
    h = image_size_hw[..., 0:1]
    w = image_size_hw[..., 1:2]
    x0 = jnp.clip(boxes[..., 0], 0.0, w[..., 0])
    y0 = jnp.clip(boxes[..., 1], 0.0, h[..., 0])
    x1 = jnp.clip(boxes[..., 2], 0.0, w[..., 0])
    y1 = jnp.clip(boxes[..., 3], 0.0, h[..., 0])
    return jnp.stack([x0, y0, x1, y1], axis=-1)


def has_min_size(boxes: jnp.ndarray, min_size: float, inclusive: bool = False) -> jnp.ndarray:
    """Whether both sides of [..., 4] boxes reach `min_size`.

    Sides must be > min_size (Detectron2's `nonempty(threshold)`), or with
    `inclusive` >= min_size and > 0 (torchvision's `remove_small_boxes`).
    """
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    if inclusive:
        return (w >= min_size) & (h >= min_size) & (w > 0) & (h > 0)
    return (w > min_size) & (h > min_size)
