"""Tests for ops/interpolation.py against PyTorch's F.interpolate.

tests/tools/golden/interpolation_torch.npz holds PyTorch's own resampling
matrices (F.interpolate of identity matrices, float64) and a 2-D bicubic
resize, written by projects/maskrcnn/tools/make_vitdet_golden.py.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.modeling.backbones.vit import resize_abs_pos
from projects.maskrcnn.ops import interpolation

GOLDEN = pathlib.Path(__file__).parents[1] / 'tools' / 'golden' / 'interpolation_torch.npz'


@pytest.fixture(scope='module')
def golden():
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


def _pairs(golden, kind):
    pairs = [tuple(int(v) for v in k.split('_')[1:]) for k in golden if k.startswith(kind)]
    assert len(pairs) >= 10
    return pairs


def test_bicubic_matrix_matches_pytorch(golden):
    for n, m in _pairs(golden, 'bicubic'):
        np.testing.assert_allclose(interpolation.bicubic_matrix(n, m), golden[f'bicubic_{n}_{m}'],
                                   rtol=0, atol=1e-6, err_msg=f'{n} -> {m}')


def test_linear_matrix_matches_pytorch(golden):
    for n, m in _pairs(golden, 'linear'):
        np.testing.assert_allclose(interpolation.linear_matrix(n, m), golden[f'linear_{n}_{m}'],
                                   rtol=0, atol=1e-6, err_msg=f'{n} -> {m}')


def test_position_grid_resize_matches_pytorch_bicubic(golden):
    grid = golden['grid_in'].astype(np.float32)  # [14, 14, 3], PyTorch's float64 result
    table = np.concatenate([np.full((1, 3), 99.0, np.float32), grid.reshape(-1, 3)])[None]
    ours = np.asarray(resize_abs_pos(jnp.asarray(table), (11, 15)), np.float64)
    # float32 arithmetic: 1e-6 of the values' scale.
    scale = np.abs(golden['grid_out']).max()
    assert np.abs(ours - golden['grid_out']).max() <= 1e-6 * scale


def test_jax_image_resize_is_not_pytorch_bicubic(golden):
    """Why the matrices exist: jax's bicubic (A = -0.5, renormalised borders) differs."""
    theirs = jax.image.resize(jnp.asarray(golden['grid_in']), (11, 15, 3), 'bicubic')
    assert np.abs(np.asarray(theirs) - golden['grid_out']).max() > 1e-2


def test_hand_computed_bicubic_row():
    # Upsampling 4 -> 8: output 0 sits at source -0.25, taps -2..1 clamp to 0, 0, 0, 1.
    # t = 0.75: weights far(1.75), near(0.75), near(0.25), far(1.25) with A = -0.75.
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    expected = [far(1.75) + near(0.75) + near(0.25), far(1.25), 0, 0]
    np.testing.assert_allclose(interpolation.bicubic_matrix(4, 8)[0], expected, atol=1e-12)
    np.testing.assert_allclose(interpolation.bicubic_matrix(4, 8).sum(1), 1.0, atol=1e-12)


def test_identity_and_bad_sizes():
    np.testing.assert_array_equal(interpolation.bicubic_matrix(14, 14), np.eye(14))
    np.testing.assert_array_equal(interpolation.linear_matrix(5, 5), np.eye(5))
    with pytest.raises(ValueError, match='out_size=0'):
        interpolation.bicubic_matrix(14, 0)
