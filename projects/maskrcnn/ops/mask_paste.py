"""Pastes box-relative mask probabilities into full-image binary masks (numpy).

Follows the semantics of torchvision's `paste_masks_in_image`, so that mask AP
is comparable with torchvision and Detectron2 ("legacy" paste) numbers:

1. The [M, M] probabilities are zero-padded by `padding` pixels on each side and
   the box is scaled about its centre by (M + 2 * padding) / M, so the padded
   mask covers the padded box. Without the padding the bilinear resize would
   smear the border values of the mask out to the box edges.
2. The expanded box is cast to integer pixels by truncation towards zero (int64
   cast of a float32 box). It covers pixels x0..x1 inclusive, i.e. x1 - x0 + 1
   columns (at least 1), and likewise for rows.
3. The padded mask is bilinearly resized to that size with align_corners=False
   (F.interpolate), thresholded with `>= threshold` and written into the image,
   clipped at its borders.

This runs on the host after the model; it is plain numpy and imports nothing of
the project.
"""

import numpy as np


def _linear_resize_weights(in_size: int, out_size: int, start: int,
                           stop: int) -> np.ndarray:
    """Rows [start, stop) of the [out_size, in_size] bilinear resize matrix.

    Matches PyTorch's linear interpolation with align_corners=False: output pixel
    i samples source coordinate (i + 0.5) * in / out - 0.5, clamped at 0 below,
    and the upper neighbour is clamped at in_size - 1.

    Returns:
      float32 [stop - start, in_size]; each row sums to 1.
    """
    dst = np.arange(start, stop, dtype=np.float32)
    src = (dst + 0.5) * np.float32(in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = src - lower
    rows = np.arange(stop - start)
    weights = np.zeros((stop - start, in_size), np.float32)
    # Two statements so that lower == upper (last row) accumulates to 1.
    weights[rows, lower] += 1.0 - frac
    weights[rows, upper] += frac
    return weights


def _expand_and_round_boxes(boxes_xyxy: np.ndarray, scale_x: float,
                            scale_y: float) -> np.ndarray:
    """Scales [N, 4] boxes about their centres, then truncates to int64 pixels.

    Done in float32 like torchvision so that boxes landing near an integer round
    the same way. Non-finite boxes become (0, 0, -1, -1), which pastes nothing.
    """
    boxes = boxes_xyxy.astype(np.float32)
    with np.errstate(invalid='ignore', over='ignore'):  # inf - inf is handled below.
        half_w = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5 * scale_x)
        half_h = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5 * scale_y)
        ctr_x = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
        ctr_y = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
        expanded = np.stack(
            [ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h], axis=1)
    finite = np.all(np.isfinite(expanded), axis=1)
    # Clamp far out of any image before the cast so that int64 cannot overflow.
    expanded = np.clip(np.where(finite[:, None], expanded, 0.0), -1e9, 1e9)
    rounded = np.trunc(expanded).astype(np.int64)
    rounded[~finite] = (0, 0, -1, -1)
    return rounded


def _paste_one(mask: np.ndarray, box: np.ndarray, out: np.ndarray,
               threshold: float) -> None:
    """Resizes one padded [Mh, Mw] mask into the integer box and writes `out`.

    Args:
      mask: float32 [Mh, Mw] padded probabilities.
      box: int64 (x0, y0, x1, y1), inclusive pixel bounds.
      out: bool [height, width] image mask, written in place.
      threshold: pixels with probability >= threshold are set.
    """
    height, width = out.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    box_w = max(x1 - x0 + 1, 1)
    box_h = max(y1 - y0 + 1, 1)
    # Visible part of the box in image pixels; empty for boxes off the image.
    img_x0, img_x1 = max(x0, 0), min(x1 + 1, width)
    img_y0, img_y1 = max(y0, 0), min(y1 + 1, height)
    if img_x1 <= img_x0 or img_y1 <= img_y0:
        return
    # Only interpolate the visible rows and columns of the resized box.
    rows = _linear_resize_weights(mask.shape[0], box_h, img_y0 - y0, img_y1 - y0)
    cols = _linear_resize_weights(mask.shape[1], box_w, img_x0 - x0, img_x1 - x0)
    resized = rows @ mask @ cols.T
    out[img_y0:img_y1, img_x0:img_x1] = resized >= threshold


def paste_masks(masks: np.ndarray,
                boxes_xyxy: np.ndarray,
                height: int,
                width: int,
                threshold: float = 0.5,
                padding: int = 1) -> np.ndarray:
    """Pastes box-relative mask probabilities into [height, width] images.

    Args:
      masks: [N, M, M] mask probabilities in box coordinates (non-square
        [N, Mh, Mw] works too, each axis expanded by its own factor).
      boxes_xyxy: [N, 4] boxes in pixels of the target image, the boxes the
        masks were predicted in. Degenerate and non-finite boxes are allowed.
      height: target image height.
      width: target image width.
      threshold: probability at or above which a pixel belongs to the mask.
      padding: zero border, in mask pixels, added before resizing.

    Returns:
      bool [N, height, width] binary masks.
    """
    masks = np.asarray(masks, np.float32)
    boxes_xyxy = np.asarray(boxes_xyxy)
    if masks.ndim != 3 or boxes_xyxy.shape != (masks.shape[0], 4):
        raise ValueError(
            f'Expected masks [N, M, M] and boxes [N, 4], got {masks.shape} and '
            f'{boxes_xyxy.shape}.')
    num_masks, mask_h, mask_w = masks.shape
    out = np.zeros((num_masks, height, width), dtype=bool)
    if num_masks == 0:
        return out
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    boxes = _expand_and_round_boxes(boxes_xyxy,
                                    scale_x=(mask_w + 2 * padding) / mask_w,
                                    scale_y=(mask_h + 2 * padding) / mask_h)
    for i in range(num_masks):
        _paste_one(padded[i], boxes[i], out[i], threshold)
    return out
