"""Tests for kernels/cpu.py: the XLA:CPU matmul lowerings of the primitives, against XLA's
own (DETECTAX_CPU_KERNELS=matmul against =xla), and the slice form of max pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn import kernels
from projects.maskrcnn.kernels import cpu
from projects.maskrcnn.modeling import layers

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU lowerings')


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
    for mode in ('matmul', 'xla'):
        monkeypatch.setenv('DETECTAX_CPU_KERNELS', mode)
        # A new jit per mode: the choice is made when the function is traced.
        grads[mode] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    (p_taps, x_taps), (p_xla, x_xla) = grads['matmul'], grads['xla']
    scale = float(jnp.max(jnp.abs(p_xla['params']['kernel'])))
    assert scale > 0
    np.testing.assert_allclose(p_taps['params']['kernel'], p_xla['params']['kernel'],
                               atol=1e-5 * scale)
    # (A 1x1 kernel's input gradient is a dot's: another summation order.)
    np.testing.assert_allclose(x_taps, x_xla, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_taps['params']['bias'], p_xla['params']['bias'], rtol=1e-6)
    # The forward pass is XLA's either way.
    np.testing.assert_array_equal(module.apply(params, x), jax.lax.conv_general_dilated(
        x, params['params']['kernel'], (stride, stride), [(kernel // 2,) * 2] * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + params['params']['bias'])


def test_tap_kernel_gradient_is_used_on_cpu_and_bad_mode_is_named(monkeypatch):
    x = jnp.ones((1, 4, 4, 16))
    w = jnp.ones((3, 3, 16, 2))
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'matmul')
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(kernels.conv(
        x, k, (1, 1), ((1, 1), (1, 1))))))(w))
    assert ('custom_vjp' in jaxpr) == (jax.default_backend() == 'cpu')
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'fast')
    with pytest.raises(ValueError, match="DETECTAX_CPU_KERNELS='fast'"):
        kernels.conv(x, w, (1, 1), ((1, 1), (1, 1)))


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
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'matmul')
    out, vjp = jax.vjp(jax.jit(lambda a, b: kernels.matmul(a, b)), x, w)
    dx, dw = vjp(dy)
    assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    xf, wf, dyf = _f32(x), _f32(w), _f32(dy)
    rows = tuple(range(len(x_shape) - 1))
    for got, want in ((out, xf @ wf), (dx, dyf @ wf.T),
                      (dw, np.tensordot(xf, dyf, axes=(rows, rows)))):
        np.testing.assert_allclose(_f32(got), want, rtol=2 ** -8, atol=2 ** -8 * np.abs(want).max())
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(kernels.matmul(a, b))))(x, w))
    assert 'custom_vjp' in jaxpr and 'preferred_element_type=float32' in jaxpr
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'xla')
    # (A new lambda per trace: the choice is made when the function is traced.)
    assert 'custom_vjp' not in str(jax.make_jaxpr(lambda a, b: kernels.matmul(a, b))(x, w))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU lowering')
@pytest.mark.parametrize('kernel', [1, 3])
def test_bfloat16_weight_gradient_dots_are_row_major(monkeypatch, kernel):
    # XLA folds a plain transpose into the weight gradient's dot as a contraction over
    # dimension 0, which XLA:CPU runs upcast to float32. The row-major copy of x^T
    # (or dy^T) keeps every dot of the compiled gradient in [M, K] @ [K, N] form.
    x, w = _bf16((2, 8, 8, 32), 10), _bf16((kernel, kernel, 32, 24), 11)
    pad = kernel // 2
    conv = lambda a, b: kernels.conv(a, b, (1, 1), ((pad, pad), (pad, pad)))  # noqa: E731

    def compiled_grad():
        grad = jax.grad(lambda a, b: jnp.sum(conv(a, b).astype(jnp.float32) ** 2), argnums=1)
        hlo = jax.jit(grad).lower(x, w).compile().as_text()
        return [line for line in hlo.splitlines() if ' dot(' in line]

    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'matmul')
    dots = compiled_grad()
    assert dots and not [d for d in dots if 'lhs_contracting_dims={0}' in d], dots
    # The check can fail: the folded form is what a plain transpose gives.
    monkeypatch.setattr(cpu, 'row_major_transpose', lambda a: a.T)
    assert [d for d in compiled_grad() if 'lhs_contracting_dims={0}' in d]


def test_float32_lowering_dots_for_1x1_only(monkeypatch):
    # float32: a 1x1 convolution is a plain dot (no float32-sum custom rule needed);
    # a 3x3 one keeps XLA's forward convolution.
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'matmul')
    x, w = jnp.ones((2, 4, 4, 16)), jnp.ones((1, 1, 16, 8))
    assert 'custom_vjp' not in str(jax.make_jaxpr(lambda a, b: kernels.matmul(a, b))(x, w[0, 0]))
    conv = lambda a, b, pad: kernels.conv(a, b, (1, 1), ((pad, pad), (pad, pad)))  # noqa: E731
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv(a, b, 0))(x, w))
    assert 'conv_general_dilated' not in jaxpr and 'custom_vjp' not in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv(a, b, 1))(x, jnp.ones((3, 3, 16, 8))))
    assert 'conv_general_dilated' in jaxpr
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'xla')
    assert 'conv_general_dilated' in str(jax.make_jaxpr(lambda a, b: conv(a, b, 0))(x, w))


@pytest.mark.parametrize('stride', [1, 2])
def test_float32_1x1_conv_as_dot_equals_the_convolution(monkeypatch, stride):
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 7, 6, 24))
    w = jax.random.normal(jax.random.PRNGKey(9), (1, 1, 24, 5))
    conv = lambda a, b: kernels.conv(a, b, (stride, stride), ((0, 0), (0, 0)))  # noqa: E731
    loss = lambda a, b: jnp.sum(jnp.sin(conv(a, b)))  # noqa: E731
    out = {}
    for mode in ('matmul', 'xla'):
        monkeypatch.setenv('DETECTAX_CPU_KERNELS', mode)
        out[mode] = (jax.jit(lambda a, b: conv(a, b))(x, w),
                     jax.jit(jax.grad(lambda a, b: loss(a, b), argnums=(0, 1)))(x, w))
    np.testing.assert_allclose(out['matmul'][0], out['xla'][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(out['matmul'][1], out['xla'][1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_bfloat16_1x1_conv_as_matmul_equals_the_convolution(monkeypatch, stride):
    module = layers.conv(24, 1, stride, use_bias=True, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 7, 32))
    params = module.init(jax.random.PRNGKey(0), x)

    def loss(p, v):
        return jnp.sum(module.apply(p, v).astype(jnp.float32) * jnp.arange(24))

    grads, outs = {}, {}
    for mode in ('matmul', 'xla'):
        monkeypatch.setenv('DETECTAX_CPU_KERNELS', mode)
        outs[mode] = jax.jit(lambda p, v: module.apply(p, v))(params, x)
        grads[mode] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    assert outs['matmul'].shape == outs['xla'].shape == (2, 6 // stride, -(-7 // stride), 24)
    scale = np.abs(_f32(outs['xla'])).max()
    np.testing.assert_allclose(_f32(outs['matmul']), _f32(outs['xla']), atol=2 ** -7 * scale)
    (p_dots, x_dots), (p_xla, x_xla) = grads['matmul'], grads['xla']
    for got, want in ((p_dots['params']['kernel'], p_xla['params']['kernel']), (x_dots, x_xla)):
        np.testing.assert_allclose(_f32(got), _f32(want), atol=2 ** -7 * np.abs(_f32(want)).max())
    # d loss / d bias[o] = o * (output pixels), summed in float32 by add_bias: exact
    # (XLA's bfloat16 sum of the same values is off by up to 8% here).
    pixels = np.prod(outs['matmul'].shape[:-1])
    np.testing.assert_array_equal(p_dots['params']['bias'], np.arange(24) * pixels)
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'matmul')
    assert 'conv_general_dilated' not in str(
        jax.make_jaxpr(lambda p, v: module.apply(p, v))(params, x))


@pytest.mark.parametrize('shape,kernel,stride,padding', [
    ((2, 9, 11, 16), 3, 1, 1),
    ((1, 8, 9, 16), 3, 1, 0),      # no padding: the gradient's padding is uneven
    ((1, 9, 9, 16), 5, 1, 2),
])
def test_bfloat16_conv_as_tap_dots_sums_in_float32(monkeypatch, shape, kernel, stride, padding):
    # With the matmul lowering a stride-1 bfloat16 convolution and its input gradient
    # are one float32-accumulated dot per kernel tap, rounded once: within bfloat16
    # rounding of float32 arithmetic on the same values.
    x, w = _bf16(shape, 5), _bf16((kernel, kernel, shape[-1], 8), 6)
    pads = ((padding, padding), (padding, padding))
    conv = lambda a, b: kernels.conv(a, b, (stride, stride), pads)  # noqa: E731
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'matmul')
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
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'xla')
    assert 'dot_general' not in str(jax.make_jaxpr(lambda a, b: conv(a, b))(x, w))
    # Strided taps are copies: a stride-2 convolution keeps XLA's forward pass.
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'matmul')
    assert 'conv_general_dilated' in str(jax.make_jaxpr(
        lambda a, b: kernels.conv(a, b, (2, 2), pads))(x, w))


@pytest.mark.parametrize('mode', ['matmul', 'xla'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape,window,strides,padding', [
    ((2, 9, 12, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),   # the ResNet stem's pool
    ((1, 8, 7, 2), (2, 3), (1, 2), ((0, 1), (1, 0))),
])
def test_max_pool_equals_reduce_window_with_its_gradient(monkeypatch, mode, dtype, shape, window,
                                                         strides, padding):
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', mode)
    # Integer-valued inputs after a ReLU: many tied maxima (zeros), where the
    # gradient must go to one element per window, not be split.
    x = jnp.maximum(jax.random.randint(jax.random.PRNGKey(0), shape, -3, 3), 0).astype(dtype)
    want = nn.max_pool(x, window, strides=strides, padding=padding)
    # A new function per mode: traces are cached by function, the switch read when tracing.
    got = jax.jit(lambda v: kernels.max_pool(v, window, strides, padding))(x)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.float32(got), np.float32(want))
    dy = jax.random.normal(jax.random.PRNGKey(1), want.shape, dtype)
    grad = lambda f: jax.jit(jax.grad(lambda v: (f(v) * dy).astype(jnp.float32).sum()))(x)
    want_dx = grad(lambda v: nn.max_pool(v, window, strides=strides, padding=padding))
    got_dx = grad(lambda v: kernels.max_pool(v, window, strides, padding))
    np.testing.assert_array_equal(np.float32(got_dx), np.float32(want_dx))
