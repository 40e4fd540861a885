"""Anchor boxes for a feature pyramid, computed once per static image size.

Anchors are laid out the way the RPN head's outputs are flattened: for each
level, row-major over feature positions (y, x), then over the anchors of one
cell (size-major, then aspect ratio). Follows Detectron2's DefaultAnchorGenerator.
"""

from typing import Sequence

import numpy as np


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float],
                 round_to_int: bool = False) -> np.ndarray:
    """Anchors centred on (0, 0): [len(sizes) * len(aspect_ratios), 4] xyxy.

    An aspect ratio is height / width; every anchor of size s has area s**2.
    `round_to_int` rounds the corners half-to-even to whole pixels, as
    torchvision's AnchorGenerator does (Detectron2 keeps them exact).
    """
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = np.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    anchors = np.asarray(anchors, np.float32)
    return np.round(anchors) if round_to_int else anchors


def grid_anchors(feature_hw: Sequence[int], stride: int, sizes: Sequence[float],
                 aspect_ratios: Sequence[float], offset: float = 0.0,
                 round_to_int: bool = False) -> np.ndarray:
    """All anchors of one level: [H * W * A, 4] xyxy in image pixels."""
    base = cell_anchors(sizes, aspect_ratios, round_to_int)
    h, w = feature_hw
    xs = (np.arange(w, dtype=np.float32) + offset) * stride
    ys = (np.arange(h, dtype=np.float32) + offset) * stride
    shift_y, shift_x = np.meshgrid(ys, xs, indexing='ij')
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def pyramid_anchors(feature_hws: Sequence[Sequence[int]], strides: Sequence[int],
                    sizes_per_level: Sequence[Sequence[float]],
                    aspect_ratios: Sequence[float], offset: float = 0.0,
                    round_to_int: bool = False) -> list[np.ndarray]:
    """Anchors for every level: a list of [H_l * W_l * A, 4] arrays."""
    if not len(feature_hws) == len(strides) == len(sizes_per_level):
        raise ValueError(
            f'anchor sizes are given for {len(sizes_per_level)} levels, but the '
            f'pyramid has {len(feature_hws)} levels with strides {tuple(strides)}')
    return [grid_anchors(hw, s, sz, aspect_ratios, offset, round_to_int)
            for hw, s, sz in zip(feature_hws, strides, sizes_per_level)]
