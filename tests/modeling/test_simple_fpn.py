"""Tests for modeling/necks/simple_fpn.py (parity with the published definition
computed in torch is in tests/tools/test_vitdet_parity.py)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.modeling.necks.simple_fpn import SimpleFPN


def test_levels_sizes_and_p6_subsamples_p5():
    model = SimpleFPN(channels=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 15, 16))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    levels = jax.jit(model.apply)(variables, x)
    assert [p.shape for p in levels] == [(2, 44, 60, 8), (2, 22, 30, 8), (2, 11, 15, 8),
                                         (2, 5, 7, 8), (2, 3, 4, 8)]
    np.testing.assert_array_equal(levels[4], levels[3][:, ::2, ::2])
    # Every level ends in a channel LayerNorm (initial scale 1, bias 0).
    for p in levels[:4]:
        np.testing.assert_allclose(p.mean(-1), 0, atol=1e-5)
    assert len(SimpleFPN(channels=8, top_block='none').apply(variables, x)) == 4


def test_parameter_names_spell_detectron2_keys():
    variables = jax.eval_shape(SimpleFPN(channels=8).init, jax.random.PRNGKey(0),
                               jnp.zeros((1, 4, 4, 16)))
    flat = {'/'.join(k): v.shape for k, v in
            flax.traverse_util.flatten_dict(variables['params']).items()}
    assert flat['simfp_2_0/kernel'] == (2, 2, 16, 8)
    assert flat['simfp_2_1/scale'] == (8,)
    assert flat['simfp_2_3/kernel'] == (2, 2, 8, 4)
    assert flat['simfp_3_0/kernel'] == (2, 2, 16, 8)
    assert flat['simfp_2_4/kernel'] == (1, 1, 4, 8) and flat['simfp_2_5/kernel'] == (3, 3, 8, 8)
    assert flat['simfp_5_2_norm/bias'] == (8,)
    assert 'simfp_4_0/bias' not in flat  # the pyramid's convs have no bias
    assert len(flat) == 32


def test_bad_input_is_named():
    with pytest.raises(ValueError, match='one \\[B, h, w, C\\] map'):
        SimpleFPN().init(jax.random.PRNGKey(0), [jnp.zeros((1, 4, 4, 16))] * 2)
    with pytest.raises(ValueError, match="top_block 'pool'"):
        SimpleFPN(top_block='pool').init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 16)))
