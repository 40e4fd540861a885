"""Anchor boxes for a feature pyramid, computed once per static image size.

Anchors are laid out the way the RPN head's outputs are flattened: for each
level, row-major over feature positions (y, x), then over the anchors of one
cell. Within a cell the order is a convention of the weights' source:
'size_major' (every ratio of the first size, then of the next; Detectron2's
DefaultAnchorGenerator, which this follows) or 'ratio_major' (every size of
the first ratio, then of the next; torchvision's AnchorGenerator). With one
size per level the two orders are the same.
"""

from collections.abc import Sequence

import numpy as np

ORDERS = ('size_major', 'ratio_major')


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float],
                 round_to_int: bool = False, order: str = 'size_major') -> np.ndarray:
    """Anchors centred on (0, 0): [len(sizes) * len(aspect_ratios), 4] xyxy.

    An aspect ratio is height / width; every anchor of size s has area s**2.
    `round_to_int` rounds the corners half-to-even to whole pixels, as
    torchvision's AnchorGenerator does (Detectron2 keeps them exact). `order`
    is 'size_major' or 'ratio_major' (see the module docstring).
    """
    if order not in ORDERS:
        raise ValueError(f'unknown anchor order {order!r} (model.anchors.order); '
                         f'expected one of {ORDERS}')
    pairs = ([(s, r) for s in sizes for r in aspect_ratios] if order == 'size_major'
             else [(s, r) for r in aspect_ratios for s in sizes])
    anchors = []
    for size, ratio in pairs:
        w = np.sqrt(float(size) ** 2 / ratio)
        h = ratio * w
        anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    anchors = np.asarray(anchors, np.float32)
    return np.round(anchors) if round_to_int else anchors


def grid_anchors(feature_hw: Sequence[int], stride: int, sizes: Sequence[float],
                 aspect_ratios: Sequence[float], offset: float = 0.0,
                 round_to_int: bool = False, order: str = 'size_major') -> np.ndarray:
    """All anchors of one level: [H * W * A, 4] xyxy in image pixels."""
    base = cell_anchors(sizes, aspect_ratios, round_to_int, order)
    h, w = feature_hw
    xs = (np.arange(w, dtype=np.float32) + offset) * stride
    ys = (np.arange(h, dtype=np.float32) + offset) * stride
    shift_y, shift_x = np.meshgrid(ys, xs, indexing='ij')
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def pyramid_anchors(feature_hws: Sequence[Sequence[int]], strides: Sequence[int],
                    sizes_per_level: Sequence[Sequence[float]],
                    aspect_ratios: Sequence[float], offset: float = 0.0,
                    round_to_int: bool = False, order: str = 'size_major'
                    ) -> list[np.ndarray]:
    """Anchors for every level: a list of [H_l * W_l * A, 4] arrays."""
    if not len(feature_hws) == len(strides) == len(sizes_per_level):
        raise ValueError(
            f'anchor sizes are given for {len(sizes_per_level)} levels, but the '
            f'pyramid has {len(feature_hws)} levels with strides {tuple(strides)}')
    return [grid_anchors(hw, s, sz, aspect_ratios, offset, round_to_int, order)
            for hw, s, sz in zip(feature_hws, strides, sizes_per_level)]
