"""The cell-anchor order convention: Detectron2's size-major, torchvision's ratio-major."""

import numpy as np
import pytest

from projects.maskrcnn.ops import anchors as anchor_ops

# torchvision 0.29.1: AnchorGenerator(sizes=((32, 64),), aspect_ratios=((0.25, 1.0, 4.0),))
# on a 64 x 64 image with a 2 x 2 feature map (stride 32), in its output order.
TORCHVISION_2X2 = np.array([
    [-32, -8, 32, 8], [-64, -16, 64, 16], [-16, -16, 16, 16], [-32, -32, 32, 32],
    [-8, -32, 8, 32], [-16, -64, 16, 64], [0, -8, 64, 8], [-32, -16, 96, 16],
    [16, -16, 48, 16], [0, -32, 64, 32], [24, -32, 40, 32], [16, -64, 48, 64],
    [-32, 24, 32, 40], [-64, 16, 64, 48], [-16, 16, 16, 48], [-32, 0, 32, 64],
    [-8, 0, 8, 64], [-16, -32, 16, 96], [0, 24, 64, 40], [-32, 16, 96, 48],
    [16, 16, 48, 48], [0, 0, 64, 64], [24, 0, 40, 64], [16, -32, 48, 96]], np.float32)


def _anchors(order):
    return anchor_ops.pyramid_anchors([(2, 2)], [32], [(32, 64)], (0.25, 1.0, 4.0),
                                      round_to_int=True, order=order)[0]


def test_ratio_major_is_torchvisions_order():
    np.testing.assert_array_equal(_anchors('ratio_major'), TORCHVISION_2X2)


def test_size_major_is_the_same_set_in_another_order():
    size_major = _anchors('size_major')
    assert not np.array_equal(size_major, TORCHVISION_2X2)
    # The same six cell anchors per position, permuted within each cell.
    perm = [0, 3, 1, 4, 2, 5]   # size-major slot of each ratio-major slot
    np.testing.assert_array_equal(size_major.reshape(4, 6, 4)[:, perm],
                                  TORCHVISION_2X2.reshape(4, 6, 4))


def test_one_size_per_level_is_order_free():
    a = anchor_ops.cell_anchors((32,), (0.5, 1.0, 2.0), order='ratio_major')
    np.testing.assert_array_equal(a, anchor_ops.cell_anchors((32,), (0.5, 1.0, 2.0)))


def test_unknown_order_names_the_key():
    with pytest.raises(ValueError, match='model.anchors.order'):
        anchor_ops.cell_anchors((32,), (1.0,), order='sizes_first')
