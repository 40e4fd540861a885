"""Tests for modeling/layers.py: Upsample2xConv, FrozenBatchNorm, norms, Conv, dense.

The lowerings underneath are tested in tests/kernels/.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.modeling import layers


def _transposed_conv_reference(x, kernel, bias):
    """out[2i + a, 2j + b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] + bias[o]."""
    n, h, w, _ = x.shape
    o = kernel.shape[-1]
    out = np.zeros((n, 2 * h, 2 * w, o))
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for a in range(2):
                    for bb in range(2):
                        out[b, 2 * i + a, 2 * j + bb] = x[b, i, j] @ kernel[a, bb] + bias
    return out


def test_upsample2x_conv_matches_explicit_transposed_convolution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    kernel = rng.normal(size=(2, 2, 5, 6)).astype(np.float32)
    bias = rng.normal(size=(6,)).astype(np.float32)
    module = layers.Upsample2xConv(6)
    params = {'params': {'kernel': jnp.asarray(kernel), 'bias': jnp.asarray(bias)}}
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(x))
    assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == \
        {'params': {'kernel': (2, 2, 5, 6), 'bias': (6,)}}
    out = module.apply(params, jnp.asarray(x))
    assert out.shape == (2, 6, 8, 6)
    np.testing.assert_allclose(out, _transposed_conv_reference(x, kernel, bias),
                               rtol=1e-5, atol=1e-5)


def test_upsample2x_conv_single_pixel_hand_case():
    # One input pixel with channels (1, 2): each output (a, b) is k[a, b, 0] + 2 k[a, b, 1].
    kernel = np.arange(8, dtype=np.float32).reshape(2, 2, 2, 1)  # k[a, b, c, 0] = 4a + 2b + c
    out = layers.Upsample2xConv(1).apply(
        {'params': {'kernel': jnp.asarray(kernel), 'bias': jnp.array([0.5])}},
        jnp.array([[[[1.0, 2.0]]]]))
    np.testing.assert_allclose(out[0, :, :, 0], [[0 + 2 + 0.5, 2 + 6 + 0.5],
                                                 [4 + 10 + 0.5, 6 + 14 + 0.5]])


def test_frozen_batch_norm_arithmetic():
    x = jnp.array([[1.0, -2.0], [3.0, 4.0]])
    variables = {'frozen': {'scale': jnp.array([2.0, 0.5]), 'bias': jnp.array([1.0, 0.0]),
                            'mean': jnp.array([1.0, -1.0]), 'var': jnp.array([4.0, 0.25])}}
    out = layers.FrozenBatchNorm(epsilon=0.0).apply(variables, x)
    # (x - mean) / sqrt(var) * scale + bias
    np.testing.assert_allclose(out, [[1.0, -1.0], [3.0, 5.0]], rtol=1e-6)
    shapes = jax.eval_shape(layers.FrozenBatchNorm().init, jax.random.PRNGKey(0), x)
    assert set(shapes) == {'frozen'}  # nothing for the optimiser


@pytest.mark.parametrize('channels,groups', [(256, 32), (64, 32), (48, 24), (31, 31), (1, 1),
                                             (40, 20)])
def test_group_count(channels, groups):
    assert layers.group_count(channels) == groups


def test_make_norm_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        layers.make_norm('batch', True, jnp.float32, 'n')


def test_make_norm_ln_normalises_each_position_over_its_channels():
    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, size=(2, 3, 4, 16)), jnp.float32)
    norm = layers.make_norm('ln', False, jnp.float32, 'n')
    variables = norm.init(jax.random.PRNGKey(0), x)
    assert set(variables['params']) == {'scale', 'bias'}
    y = np.asarray(norm.apply(variables, x))
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-3)
    xs = np.asarray(x)
    expected = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_conv_uses_symmetric_padding(stride):
    # An all-ones 3x3 kernel on an all-ones 5x5 map: border outputs see 6 ones,
    # corners 4, interior 9 - whatever the stride, as PyTorch's padding=1 does.
    module = layers.conv(1, 3, stride)
    out = module.apply({'params': {'kernel': jnp.ones((3, 3, 1, 1))}}, jnp.ones((1, 5, 5, 1)))
    expected = np.array([[4, 6, 6, 6, 4], [6, 9, 9, 9, 6], [6, 9, 9, 9, 6],
                         [6, 9, 9, 9, 6], [4, 6, 6, 6, 4]], np.float32)[::stride, ::stride]
    np.testing.assert_array_equal(out[0, ..., 0], expected)
    assert isinstance(module, layers.Conv)


@pytest.mark.parametrize('mode', ['auto', 'matmul', 'xla'])
def test_conv_module_is_flax_conv_with_a_matmul_bias_gradient(monkeypatch, mode):
    # The project's Conv has nn.Conv's parameters and arithmetic (checkpoints carry
    # over) with every lowering; on the CPU its bias gradient, a float32 matmul with
    # a ones row, is the plain sum.
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', mode)
    module = layers.conv(8, 3, 2, use_bias=True)
    flax_conv = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=True)
    x = jax.random.normal(jax.random.PRNGKey(12), (2, 7, 9, 16))
    params = module.init(jax.random.PRNGKey(0), x)
    assert (jax.tree.map(jnp.shape, params)
            == jax.tree.map(jnp.shape, flax_conv.init(jax.random.PRNGKey(0), x)))
    params = jax.tree.map(lambda p: p + 0.1, params)   # a non-zero bias
    weights = jax.random.normal(jax.random.PRNGKey(13), (2, 4, 5, 8))
    grads = [jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply(p, x) * weights)))(params)
             for m in (module, flax_conv)]
    np.testing.assert_allclose(module.apply(params, x), flax_conv.apply(params, x),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0]['params']['kernel'], grads[1]['params']['kernel'],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[0]['params']['bias'], weights.sum((0, 1, 2)), rtol=1e-5)
    # Leading batch dimensions are flattened and restored.
    stacked = module.apply(params, jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(stacked[1], module.apply(params, 2 * x), rtol=1e-5, atol=1e-5)


def _f32(x):
    return np.asarray(x.astype(jnp.float32))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU lowering')
def test_bfloat16_dense_and_upsample_go_through_the_matmul(monkeypatch):
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'auto')
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 2, 8))
    for module, want in ((layers.dense(5, dtype=jnp.bfloat16), None),
                         (layers.Upsample2xConv(6, dtype=jnp.bfloat16), 'reference')):
        params = module.init(jax.random.PRNGKey(0), x)
        assert 'custom_vjp' in str(jax.make_jaxpr(lambda p, v, m=module: m.apply(p, v))(params, x))
        if want:
            p = jax.tree_util.tree_map(lambda a: np.asarray(a.astype(jnp.bfloat16), np.float32),
                                       params['params'])
            ref = _transposed_conv_reference(_f32(x.astype(jnp.bfloat16)), p['kernel'], p['bias'])
            np.testing.assert_allclose(_f32(module.apply(params, x)), ref,
                                       atol=2 ** -7 * np.abs(ref).max())
