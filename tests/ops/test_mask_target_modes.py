"""The mask-target conventions: 'hard' (Detectron2, tensorflow/tpu) and 'soft' (torchvision)."""

import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.ops import targets as target_ops


def _full_box(mode):
    # One ground truth whose 28 x 28 crop is all ones over its box (0, 0, 28, 28),
    # read at the same box.
    box = jnp.array([[0.0, 0.0, 28.0, 28.0]])
    return np.asarray(target_ops.mask_targets(jnp.ones((1, 28, 28)), box, jnp.array([0]),
                                              box, 28, mode))[0]


def test_hard_targets_of_the_own_box_are_all_ones():
    np.testing.assert_array_equal(_full_box('hard'), np.ones((28, 28)))


def test_soft_targets_shift_half_a_pixel_and_average():
    # aligned=False reads pixel k at k + 0.5: the last row's 3 samples sit at
    # 27.67, 28.0 and 28.33, the last past the box edge, so it keeps 2/3; the
    # corner keeps 2/3 of 2/3; the rest is inside.
    got = _full_box('soft')
    expected = np.ones((28, 28))
    expected[-1, :] = expected[:, -1] = 2 / 3
    expected[-1, -1] = 4 / 9
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_soft_targets_keep_fractions_hard_ones_threshold():
    # A mask whose left half is on; an RoI centred on the edge between halves.
    crop = np.zeros((1, 28, 28), np.float32)
    crop[:, :, :14] = 1
    box, roi = jnp.array([[0.0, 0.0, 28.0, 28.0]]), jnp.array([[10.0, 0.0, 17.0, 28.0]])
    soft = np.asarray(target_ops.mask_targets(jnp.asarray(crop), box, jnp.array([0]), roi, 7,
                                              'soft'))[0]
    hard = np.asarray(target_ops.mask_targets(jnp.asarray(crop), box, jnp.array([0]), roi, 7))[0]
    assert set(np.unique(hard)) <= {0.0, 1.0}
    assert ((soft > 0.01) & (soft < 0.99)).any()
    np.testing.assert_array_equal(hard[3], [1, 1, 1, 1, 0, 0, 0])


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match='model.mask_head.targets'):
        target_ops.mask_targets(jnp.ones((1, 4, 4)), jnp.ones((1, 4)), jnp.array([0]),
                                jnp.ones((1, 4)), 4, 'fuzzy')
