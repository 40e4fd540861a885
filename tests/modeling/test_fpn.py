"""Tests for modeling/necks/fpn.py: P2..P6 shapes and the top-down wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.modeling.necks import fpn
from tests.variables import fill_variables


def _features(hws, channels=(8, 16, 32, 64), seed=1):
    rng = np.random.default_rng(seed)
    return {f'c{i + 2}': jnp.asarray(rng.normal(size=(1, h, w, c)), jnp.float32)
            for i, ((h, w), c) in enumerate(zip(hws, channels))}


def _run(model, feats):
    variables = fill_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), feats))
    return variables, jax.jit(model.apply)(variables, feats)


def test_output_shapes_p2_to_p6():
    # C2..C5 of a 64 x 64 image.
    feats = _features([(16, 16), (8, 8), (4, 4), (2, 2)])
    _, out = _run(fpn.FPN(channels=12), feats)
    assert [o.shape for o in out] == [(1, 16, 16, 12), (1, 8, 8, 12), (1, 4, 4, 12),
                                      (1, 2, 2, 12), (1, 1, 1, 12)]


def test_odd_sizes_and_p6_is_p5_subsampled():
    feats = _features([(25, 38), (13, 19), (7, 10), (4, 5)])
    _, out = _run(fpn.FPN(channels=8), feats)
    assert [o.shape[1:3] for o in out] == [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3)]
    # Detectron2's LastLevelMaxPool: max_pool2d(kernel 1, stride 2).
    np.testing.assert_array_equal(out[4], out[3][:, ::2, ::2])


def test_top_down_pathway_only_flows_to_finer_levels():
    feats = _features([(16, 16), (8, 8), (4, 4), (2, 2)])
    model = fpn.FPN(channels=8)
    variables, base = _run(model, feats)
    apply = jax.jit(model.apply)
    # Changing C3 changes P2 and P3, never P4..P6.
    changed = apply(variables, {**feats, 'c3': feats['c3'] + 1.0})
    diffs = [float(jnp.abs(a - b).max()) for a, b in zip(base, changed)]
    assert diffs[0] > 0 and diffs[1] > 0
    assert diffs[2:] == [0.0, 0.0, 0.0]
    # Changing C5 reaches every level.
    changed = apply(variables, {**feats, 'c5': feats['c5'] + 1.0})
    assert all(float(jnp.abs(a - b).max()) > 0 for a, b in zip(base, changed))


def test_upsample2x_is_nearest_and_cropped():
    x = jnp.arange(6.0).reshape(1, 2, 3, 1)
    out = fpn.upsample2x(x, (3, 5))
    np.testing.assert_array_equal(out[0, ..., 0], [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2],
                                                   [3, 3, 4, 4, 5]])


def test_top_block_none_and_unknown():
    feats = _features([(8, 8), (4, 4), (2, 2), (1, 1)])
    shapes = jax.eval_shape(fpn.FPN(channels=4, top_block='none').init_with_output,
                            jax.random.PRNGKey(0), feats)[0]
    assert len(shapes) == 4
    with pytest.raises(ValueError, match='top_block'):
        jax.eval_shape(fpn.FPN(channels=4, top_block='pool').init, jax.random.PRNGKey(0), feats)


def test_gn_norm_variant_has_no_conv_bias():
    feats = _features([(8, 8), (4, 4), (2, 2), (1, 1)])
    params = jax.eval_shape(fpn.FPN(channels=32, norm='gn').init, jax.random.PRNGKey(0),
                            feats)['params']
    assert 'bias' not in params['lateral_c2'] and 'bias' not in params['output_c5']
    assert params['lateral_norm_c2']['scale'].shape == (32,)
    params = jax.eval_shape(fpn.FPN(channels=32).init, jax.random.PRNGKey(0), feats)['params']
    assert params['lateral_c2']['bias'].shape == (32,)
