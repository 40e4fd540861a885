"""Tests for kernels/onednn.py: oneDNN convolutions as XLA custom calls on the CPU backend."""

import os
import platform
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn import kernels
from projects.maskrcnn.kernels import onednn
from projects.maskrcnn.modeling.heads.mask_head import MaskHead
from tests.variables import fill_variables

# setup.py installs the oneDNN wheels on Linux x86-64, and the tests require the
# kernels there (test_kernels_build_here); elsewhere the oneDNN tests skip.
SUPPORTED = sys.platform == 'linux' and platform.machine() == 'x86_64'
needs_kernels = pytest.mark.skipif(not SUPPORTED, reason='oneDNN wheels: Linux x86-64 only')

NHWC = ('NHWC', 'HWIO', 'NHWC')
# (kernel side, strides, padding): the model's 3x3 and 1x1 layers, the 7x7/2 stem, a
# strided 1x1 shortcut, and asymmetric padding on an odd-sized map.
GEOMETRIES = [(3, (1, 1), ((1, 1), (1, 1))), (3, (2, 2), ((1, 1), (1, 1))),
              (7, (2, 2), ((3, 3), (3, 3))), (1, (1, 1), ((0, 0), (0, 0))),
              (1, (2, 2), ((0, 0), (0, 0))), (3, (1, 2), ((0, 2), (1, 0)))]


def _reference(x, kernel, strides, padding):
    return lax.conv_general_dilated(x.astype(jnp.float32), kernel.astype(jnp.float32), strides,
                                    padding, dimension_numbers=NHWC, precision='highest')


def _rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _custom_call_targets(fn, *args) -> set[str]:
    # A fresh function each time: jit caches traces by function, and the switches act
    # at trace time.
    text = jax.jit(lambda *a: fn(*a)).lower(*args).as_text()
    return {t for t in ('detectax_onednn_conv_forward', 'detectax_onednn_conv_input_grad',
                        'detectax_onednn_conv_kernel_grad') if t in text}


@needs_kernels
def test_kernels_build_here():
    status = onednn.status()
    assert status.available, status.reason
    assert set(status.dtypes) >= {'float32'}
    assert os.path.exists(status.library) and status.version.startswith('3.')


# float32: another summation order (relative 1e-6); bfloat16: the result is rounded to
# bfloat16 once (2^-8 relative to the largest output), as XLA's float32-summed path does.
@needs_kernels
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2 ** -7)])
@pytest.mark.parametrize('k,strides,padding', GEOMETRIES)
def test_conv_and_both_gradients_match_xla(dtype, tol, k, strides, padding):
    if jnp.dtype(dtype).name not in onednn.status().dtypes:
        pytest.skip(f'oneDNN runs no {jnp.dtype(dtype).name} on this CPU')
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((2, 9, 11, 16)), dtype)
    kernel = jnp.asarray(rng.standard_normal((k, k, 16, 8)) * 0.2, dtype)

    def loss(conv):  # a nonlinear loss, so that dy differs at every output
        return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel).astype(jnp.float32)))

    ours = lambda x, kernel: onednn.conv(x, kernel, strides, padding)  # noqa: E731
    theirs = lambda x, kernel: _reference(x, kernel, strides, padding)  # noqa: E731
    y = jax.jit(ours)(x, kernel)
    want = theirs(x, kernel)
    assert y.shape == want.shape and y.dtype == dtype
    assert _rel_err(y, want) < tol
    dx, dk = jax.jit(jax.grad(loss(ours), (0, 1)))(x, kernel)
    want_dx, want_dk = jax.grad(loss(theirs), (0, 1))(x.astype(jnp.float32),
                                                     kernel.astype(jnp.float32))
    assert dx.dtype == dtype and dk.dtype == dtype
    assert _rel_err(dx, want_dx) < 4 * tol and _rel_err(dk, want_dk) < 4 * tol


@needs_kernels
def test_vmap_folds_the_mapped_axis_into_the_batch_and_maps_kernels_per_element():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 4)) * 0.2, jnp.float32)
    conv = lambda x, k: onednn.conv(x, k, (1, 1), ((1, 1), (1, 1)))  # noqa: E731
    ref = lambda x, k: _reference(x, k, (1, 1), ((1, 1), (1, 1)))  # noqa: E731
    shared = jax.vmap(conv, (0, None))
    assert _rel_err(jax.jit(shared)(x, kernel), jax.vmap(ref, (0, None))(x, kernel)) < 1e-5
    # One call on the folded [6, 8, 8, 16] batch, no loop.
    text = jax.jit(shared).lower(x, kernel).as_text()
    assert text.count('detectax_onednn_conv_forward') == 1 and 'while' not in text
    grads = jax.jit(jax.grad(lambda x, k: jnp.sum(shared(x, k) ** 2), (0, 1)))(x, kernel)
    want = jax.grad(lambda x, k: jnp.sum(jax.vmap(ref, (0, None))(x, k) ** 2), (0, 1))(x, kernel)
    assert all(_rel_err(g, w) < 1e-5 for g, w in zip(grads, want))
    kernels = jnp.stack([kernel, 2 * kernel, -kernel])
    assert _rel_err(jax.jit(jax.vmap(conv))(x, kernels), jax.vmap(ref)(x, kernels)) < 1e-5


@needs_kernels
def test_the_conv_primitive_routes_by_mode(monkeypatch):
    x = jnp.ones((1, 8, 8, 16), jnp.float32)
    kernel = jnp.ones((3, 3, 16, 4), jnp.float32)

    def loss(x, kernel):
        return jnp.sum(jnp.sin(kernels.conv(x, kernel, (1, 1), ((1, 1), (1, 1)))))

    grad = jax.grad(loss, (0, 1))
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'auto')
    assert _custom_call_targets(grad, x, kernel) == {
        'detectax_onednn_conv_forward', 'detectax_onednn_conv_input_grad',
        'detectax_onednn_conv_kernel_grad'}
    with onednn.portable():
        assert _custom_call_targets(grad, x, kernel) == set()
    for mode in ('matmul', 'xla'):
        monkeypatch.setenv('DETECTAX_CPU_KERNELS', mode)
        assert _custom_call_targets(grad, x, kernel) == set()
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'onednn')
    assert len(_custom_call_targets(grad, x, kernel)) == 3


@needs_kernels
def test_mask_head_gives_the_same_logits_through_onednn_and_xla(monkeypatch):
    """A model block end to end (convolutions, bias, ReLU, upsampling), float32."""
    head = MaskHead(num_classes=3, conv_dim=16, num_convs=2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 7, 7, 8)), jnp.float32)
    variables = fill_variables(jax.eval_shape(head.init, jax.random.PRNGKey(0), x))
    outputs = {}
    for mode in ('onednn', 'xla'):
        monkeypatch.setenv('DETECTAX_CPU_KERNELS', mode)
        apply = lambda v, x: head.apply(v, x)  # noqa: E731 - traced anew in each mode
        assert bool(_custom_call_targets(apply, variables, x)) == (mode == 'onednn')
        outputs[mode] = jax.jit(apply)(variables, x)
    assert _rel_err(outputs['onednn'], outputs['xla']) < 1e-5


def test_bad_settings_are_named(monkeypatch):
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'fast')
    with pytest.raises(ValueError, match="DETECTAX_CPU_KERNELS='fast'"):
        onednn.enabled(jnp.float32)
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'auto')
    for value in ('0,1', '2', 'all'):
        monkeypatch.setenv('DETECTAX_ONEDNN_THREADS', value)
        with pytest.raises(ValueError, match=f"DETECTAX_ONEDNN_THREADS='{value}'"):
            onednn.threads()
    monkeypatch.setenv('DETECTAX_ONEDNN_THREADS', '2,1')
    assert onednn.threads() == (2, 1)


def test_unavailable_kernels_fall_back_once_with_the_reason_or_fail_when_required(monkeypatch):
    missing = onednn.Status(False, 'no C++ compiler (\'c++\'; set CXX)')
    monkeypatch.setattr(onednn, 'status', lambda: missing)
    monkeypatch.setattr(onednn, '_warned', False)
    warnings = []
    monkeypatch.setattr(onednn.logging, 'warning', lambda *a: warnings.append(a[0] % a[1:]))
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'auto')
    assert not onednn.enabled(jnp.float32) and not onednn.enabled(jnp.bfloat16)
    assert len(warnings) == 1 and 'set CXX' in warnings[0]
    assert 'as XLA lowers them' in onednn.describe(jnp.float32)
    # The conv primitive falls back to the matmul lowering, whose forward pass is XLA's.
    x, k = jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 16, 2))
    assert 'custom_vjp' in str(jax.make_jaxpr(lambda a, b: kernels.conv(
        a, b, (1, 1), ((1, 1), (1, 1))))(x, k))
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'onednn')
    with pytest.raises(RuntimeError, match='DETECTAX_CPU_KERNELS=onednn.*set CXX'):
        onednn.enabled(jnp.float32)
    with pytest.raises(RuntimeError, match='set CXX'):
        onednn.conv(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2)), (1, 1), ((0, 0), (0, 0)))
    # On the CPU backend only: no mode asks for the kernels on another backend.
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'onednn')
    monkeypatch.setattr(onednn.jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(onednn, 'status', lambda: pytest.fail('status() asked off the CPU'))
    assert not onednn.enabled(jnp.float32)


@needs_kernels
def test_build_names_a_missing_compiler_and_reuses_a_built_library(monkeypatch, tmp_path):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    with pytest.raises(FileNotFoundError, match='no-such-compiler.*set CXX'):
        onednn.build()
    monkeypatch.delenv('CXX')
    path = onednn.build()
    assert os.path.dirname(path) == str(tmp_path / 'detectax') and os.path.getsize(path) > 0
    mtime = os.path.getmtime(path)
    assert onednn.build() == path and os.path.getmtime(path) == mtime
    assert [p.name for p in (tmp_path / 'detectax').iterdir()] == [os.path.basename(path)]


@needs_kernels
def test_auto_leaves_several_devices_to_xla_and_on_overrides(monkeypatch):
    monkeypatch.setattr(onednn, '_warned', False)
    warnings = []
    monkeypatch.setattr(onednn.logging, 'warning', lambda *a: warnings.append(a[0] % a[1:]))
    monkeypatch.setattr(onednn.jax, 'device_count', lambda: 2)
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'auto')
    assert not onednn.enabled(jnp.float32)
    assert len(warnings) == 1 and 'no sharding rule' in warnings[0]
    monkeypatch.setenv('DETECTAX_CPU_KERNELS', 'onednn')
    assert onednn.enabled(jnp.float32)
