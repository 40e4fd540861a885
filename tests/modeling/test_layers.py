"""Tests for modeling/layers.py: Upsample2xConv, FrozenBatchNorm, norms, conv padding."""

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


@pytest.fixture(autouse=True)
def _xla_lowering(monkeypatch):
    """These tests cover the XLA lowerings; tests/test_onednn.py covers the oneDNN path."""
    monkeypatch.setenv('DETECTAX_ONEDNN', 'off')


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


@pytest.mark.parametrize('mode', ['dots', 'xla'])
def test_conv_module_is_flax_conv_with_a_matmul_bias_gradient(monkeypatch, mode):
    # The project's Conv has nn.Conv's parameters and arithmetic (checkpoints carry
    # over); its bias gradient, a float32 matmul with a ones row, is the plain sum.
    monkeypatch.setenv('DETECTAX_MATMUL', mode)
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


@pytest.mark.parametrize('shape,features,kernel,stride', [
    ((2, 9, 11, 16), 8, 3, 1),     # odd sizes, 3x3
    ((2, 10, 13, 32), 8, 3, 2),    # stride 2: taps at s*i + a, a padded edge on one side only
    ((2, 9, 9, 32), 16, 1, 2),     # 1x1 stride-2 shortcut
    ((1, 12, 12, 16), 4, 7, 2),    # large kernel
])
def test_tap_matmul_kernel_gradient_equals_xla(monkeypatch, shape, features, kernel, stride):
    module = layers.conv(features, kernel, stride, use_bias=True)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    params = module.init(jax.random.PRNGKey(0), x)

    def loss(p, v):
        return jnp.sum(jnp.sin(module.apply(p, v)) * jnp.arange(features))

    grads = {}
    for mode in ('taps', 'xla'):
        monkeypatch.setenv('DETECTAX_CONV_KERNEL_GRAD', mode)
        # A new jit per mode: the choice is made when the function is traced.
        grads[mode] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    (p_taps, x_taps), (p_xla, x_xla) = grads['taps'], grads['xla']
    scale = float(jnp.max(jnp.abs(p_xla['params']['kernel'])))
    assert scale > 0
    np.testing.assert_allclose(p_taps['params']['kernel'], p_xla['params']['kernel'],
                               atol=1e-5 * scale)
    np.testing.assert_allclose(x_taps, x_xla, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(p_taps['params']['bias'], p_xla['params']['bias'], rtol=1e-6)
    # The forward pass is XLA's either way.
    np.testing.assert_array_equal(module.apply(params, x), jax.lax.conv_general_dilated(
        x, params['params']['kernel'], (stride, stride), [(kernel // 2,) * 2] * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + params['params']['bias'])


def test_tap_kernel_gradient_is_used_on_cpu_and_bad_mode_is_named(monkeypatch):
    x = jnp.ones((1, 4, 4, 16))
    w = jnp.ones((3, 3, 16, 2))
    monkeypatch.setenv('DETECTAX_CONV_KERNEL_GRAD', 'auto')
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(layers.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')))))(w))
    assert ('custom_vjp' in jaxpr) == (jax.default_backend() == 'cpu')
    monkeypatch.setenv('DETECTAX_CONV_KERNEL_GRAD', 'fast')
    with pytest.raises(ValueError, match="DETECTAX_CONV_KERNEL_GRAD='fast'"):
        layers.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _bf16(shape, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(jnp.bfloat16)


def _f32(x):
    return np.asarray(x.astype(jnp.float32))


@pytest.mark.parametrize('x_shape', [(6, 40), (7, 40), (2, 3, 5, 40)])
def test_bfloat16_matmul_accumulates_in_float32_both_ways(monkeypatch, x_shape):
    # With the dot lowering the product and both gradients are float32 sums of the
    # bfloat16 values, rounded once: within bfloat16 rounding (2^-8) of the float32
    # arithmetic on the same values, for the output, dx and dw.
    x, w, dy = _bf16(x_shape, 0), _bf16((40, 24), 1), _bf16(x_shape[:-1] + (24,), 2)
    monkeypatch.setenv('DETECTAX_MATMUL', 'dots')
    out, vjp = jax.vjp(jax.jit(layers.matmul), x, w)
    dx, dw = vjp(dy)
    assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    xf, wf, dyf = _f32(x), _f32(w), _f32(dy)
    rows = tuple(range(len(x_shape) - 1))
    for got, want in ((out, xf @ wf), (dx, dyf @ wf.T),
                      (dw, np.tensordot(xf, dyf, axes=(rows, rows)))):
        np.testing.assert_allclose(_f32(got), want, rtol=2 ** -8, atol=2 ** -8 * np.abs(want).max())
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(layers.matmul(a, b))))(x, w))
    assert 'custom_vjp' in jaxpr and 'preferred_element_type=float32' in jaxpr
    monkeypatch.setenv('DETECTAX_MATMUL', 'xla')
    # (A new lambda per trace: the choice is made when the function is traced.)
    assert 'custom_vjp' not in str(jax.make_jaxpr(lambda a, b: layers.matmul(a, b))(x, w))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU lowering')
@pytest.mark.parametrize('kernel', [1, 3])
def test_bfloat16_weight_gradient_dots_are_row_major(monkeypatch, kernel):
    # XLA folds a plain transpose into the weight gradient's dot as a contraction over
    # dimension 0, which XLA:CPU runs upcast to float32. The row-major copy of x^T
    # (or dy^T) keeps every dot of the compiled gradient in [M, K] @ [K, N] form.
    x, w = _bf16((2, 8, 8, 32), 10), _bf16((kernel, kernel, 32, 24), 11)
    pad = kernel // 2
    conv = lambda a, b: layers.conv_general_dilated(  # noqa: E731
        a, b, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def compiled_grad():
        grad = jax.grad(lambda a, b: jnp.sum(conv(a, b).astype(jnp.float32) ** 2), argnums=1)
        hlo = jax.jit(grad).lower(x, w).compile().as_text()
        return [line for line in hlo.splitlines() if ' dot(' in line]

    monkeypatch.setenv('DETECTAX_MATMUL', 'dots')
    dots = compiled_grad()
    assert dots and not [d for d in dots if 'lhs_contracting_dims={0}' in d], dots
    # The check can fail: the folded form is what a plain transpose gives.
    monkeypatch.setattr(layers, '_row_major_transpose', lambda a: a.T)
    assert [d for d in compiled_grad() if 'lhs_contracting_dims={0}' in d]


def test_float32_lowering_dots_for_1x1_only(monkeypatch):
    # float32: a 1x1 convolution is a plain dot (no float32-sum custom rule needed);
    # a 3x3 one keeps XLA's forward convolution.
    monkeypatch.setenv('DETECTAX_MATMUL', 'dots')
    x, w = jnp.ones((2, 4, 4, 16)), jnp.ones((1, 1, 16, 8))
    assert 'custom_vjp' not in str(jax.make_jaxpr(lambda a, b: layers.matmul(a, b))(x, w[0, 0]))
    conv = lambda a, b, pad: layers.conv_general_dilated(  # noqa: E731
        a, b, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv(a, b, 0))(x, w))
    assert 'conv_general_dilated' not in jaxpr and 'custom_vjp' not in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv(a, b, 1))(x, jnp.ones((3, 3, 16, 8))))
    assert 'conv_general_dilated' in jaxpr
    monkeypatch.setenv('DETECTAX_MATMUL', 'xla')
    assert 'conv_general_dilated' in str(jax.make_jaxpr(lambda a, b: conv(a, b, 0))(x, w))


@pytest.mark.parametrize('stride', [1, 2])
def test_float32_1x1_conv_as_dot_equals_the_convolution(monkeypatch, stride):
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 7, 6, 24))
    w = jax.random.normal(jax.random.PRNGKey(9), (1, 1, 24, 5))
    conv = lambda a, b: layers.conv_general_dilated(  # noqa: E731
        a, b, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    loss = lambda a, b: jnp.sum(jnp.sin(conv(a, b)))  # noqa: E731
    out = {}
    for mode in ('dots', 'xla'):
        monkeypatch.setenv('DETECTAX_MATMUL', mode)
        out[mode] = (jax.jit(lambda a, b: conv(a, b))(x, w),
                     jax.jit(jax.grad(lambda a, b: loss(a, b), argnums=(0, 1)))(x, w))
    np.testing.assert_allclose(out['dots'][0], out['xla'][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(out['dots'][1], out['xla'][1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_bfloat16_1x1_conv_as_matmul_equals_the_convolution(monkeypatch, stride):
    module = layers.conv(24, 1, stride, use_bias=True, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 7, 32))
    params = module.init(jax.random.PRNGKey(0), x)

    def loss(p, v):
        return jnp.sum(module.apply(p, v).astype(jnp.float32) * jnp.arange(24))

    grads, outs = {}, {}
    for mode in ('dots', 'xla'):
        monkeypatch.setenv('DETECTAX_MATMUL', mode)
        outs[mode] = jax.jit(lambda p, v: module.apply(p, v))(params, x)
        grads[mode] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    assert outs['dots'].shape == outs['xla'].shape == (2, 6 // stride, -(-7 // stride), 24)
    scale = np.abs(_f32(outs['xla'])).max()
    np.testing.assert_allclose(_f32(outs['dots']), _f32(outs['xla']), atol=2 ** -7 * scale)
    (p_dots, x_dots), (p_xla, x_xla) = grads['dots'], grads['xla']
    for got, want in ((p_dots['params']['kernel'], p_xla['params']['kernel']), (x_dots, x_xla)):
        np.testing.assert_allclose(_f32(got), _f32(want), atol=2 ** -7 * np.abs(_f32(want)).max())
    # d loss / d bias[o] = o * (output pixels), summed in float32 by add_bias: exact
    # (XLA's bfloat16 sum of the same values is off by up to 8% here).
    pixels = np.prod(outs['dots'].shape[:-1])
    np.testing.assert_array_equal(p_dots['params']['bias'], np.arange(24) * pixels)
    monkeypatch.setenv('DETECTAX_MATMUL', 'dots')
    assert 'conv_general_dilated' not in str(
        jax.make_jaxpr(lambda p, v: module.apply(p, v))(params, x))


@pytest.mark.parametrize('shape,kernel,stride,padding', [
    ((2, 9, 11, 16), 3, 1, 1),
    ((1, 8, 9, 16), 3, 1, 0),      # no padding: the gradient's padding is uneven
    ((1, 9, 9, 16), 5, 1, 2),
])
def test_bfloat16_conv_as_tap_dots_sums_in_float32(monkeypatch, shape, kernel, stride, padding):
    # With the dot lowering a stride-1 bfloat16 convolution and its input gradient
    # are one float32-accumulated dot per kernel tap, rounded once: within bfloat16
    # rounding of float32 arithmetic on the same values.
    x, w = _bf16(shape, 5), _bf16((kernel, kernel, shape[-1], 8), 6)
    pads = ((padding, padding), (padding, padding))
    conv = lambda a, b: layers.conv_general_dilated(a, b, (stride, stride), pads,
                                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    monkeypatch.setenv('DETECTAX_MATMUL', 'dots')
    out, vjp = jax.vjp(jax.jit(lambda a, b: conv(a, b)), x, w)
    dy = _bf16(out.shape, 7)
    dx, dw = vjp(dy)
    assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    ref = lambda a, b: jax.lax.conv_general_dilated(
        a, b, (stride, stride), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision='highest')
    want, ref_vjp = jax.vjp(ref, jnp.asarray(_f32(x)), jnp.asarray(_f32(w)))
    want_dx, want_dw = ref_vjp(jnp.asarray(_f32(dy)))
    for got, ok in ((out, want), (dx, want_dx), (dw, want_dw)):
        ok = np.asarray(ok)
        np.testing.assert_allclose(_f32(got), ok, atol=2 ** -8 * np.abs(ok).max())
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv(a, b))(x, w))
    assert 'conv_general_dilated' not in jaxpr and 'preferred_element_type=float32' in jaxpr
    monkeypatch.setenv('DETECTAX_MATMUL', 'xla')
    assert 'dot_general' not in str(jax.make_jaxpr(lambda a, b: conv(a, b))(x, w))
    # Strided taps are copies: a stride-2 convolution keeps XLA's forward pass.
    monkeypatch.setenv('DETECTAX_MATMUL', 'dots')
    assert 'conv_general_dilated' in str(jax.make_jaxpr(lambda a, b: layers.conv_general_dilated(
        a, b, (2, 2), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w))


def test_bfloat16_dense_and_upsample_go_through_the_matmul(monkeypatch):
    monkeypatch.setenv('DETECTAX_MATMUL', 'dots')
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


def test_bad_matmul_mode_is_named(monkeypatch):
    monkeypatch.setenv('DETECTAX_MATMUL', 'amx')
    with pytest.raises(ValueError, match="DETECTAX_MATMUL='amx'"):
        layers.matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.bfloat16))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape,window,strides,padding', [
    ((2, 9, 12, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),   # the ResNet stem's pool
    ((1, 8, 7, 2), (2, 3), (1, 2), ((0, 1), (1, 0))),
])
def test_max_pool_equals_reduce_window_with_its_gradient(dtype, shape, window, strides,
                                                         padding):
    # Integer-valued inputs after a ReLU: many tied maxima (zeros), where the
    # gradient must go to one element per window, not be split.
    x = jnp.maximum(jax.random.randint(jax.random.PRNGKey(0), shape, -3, 3), 0).astype(dtype)
    want = nn.max_pool(x, window, strides=strides, padding=padding)
    got = jax.jit(layers.max_pool, static_argnums=(1, 2, 3))(x, window, strides, padding)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.float32(got), np.float32(want))
    dy = jax.random.normal(jax.random.PRNGKey(1), want.shape, dtype)
    grad = lambda f: jax.jit(jax.grad(lambda v: (f(v) * dy).astype(jnp.float32).sum()))(x)
    want_dx = grad(lambda v: nn.max_pool(v, window, strides=strides, padding=padding))
    got_dx = grad(lambda v: layers.max_pool(v, window, strides, padding))
    np.testing.assert_array_equal(np.float32(got_dx), np.float32(want_dx))
