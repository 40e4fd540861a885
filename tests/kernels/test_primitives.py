"""Tests for kernels/__init__.py and kernels/switches.py: the primitives' plain `lax` form
off the CPU backend, and the switches' errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn import kernels
from projects.maskrcnn.kernels import switches

PAD = ((1, 1), (1, 1))


def _jaxprs() -> dict[str, tuple[str, str]]:
    """Each primitive's forward and gradient jaxprs, traced anew: new functions each call,
    since traces are cached by function and the switches act at trace time."""
    x, k = jnp.ones((1, 6, 6, 16), jnp.bfloat16), jnp.ones((3, 3, 16, 4), jnp.bfloat16)
    w, b = jnp.ones((16, 4), jnp.bfloat16), jnp.ones((4,), jnp.float32)
    calls = {
        'conv': (lambda x, k: kernels.conv(x, k, (1, 1), PAD), (x, k)),
        'conv_transpose_2x2': (lambda x, k: kernels.conv_transpose_2x2(x, k), (x, k[:2, :2])),
        'matmul': (lambda x, w: kernels.matmul(x, w), (x, w)),
        'dot_general': (lambda x, w: kernels.dot_general(x, w, (((3,), (0,)), ((), ()))), (x, w)),
        'add_bias': (lambda y, b: kernels.add_bias(y, b), (x[..., :4], b)),
        'max_pool': (lambda x: kernels.max_pool(x, (3, 3), (2, 2), PAD), (x,)),
    }
    out = {}
    for name, (fn, args) in calls.items():
        loss = lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32))  # noqa: E731
        out[name] = (str(jax.make_jaxpr(fn)(*args)),
                     str(jax.make_jaxpr(jax.grad(loss, range(len(args))))(*args)))
    return out


PLAIN = {'conv': 'conv_general_dilated', 'conv_transpose_2x2': 'dot_general',
         'matmul': 'dot_general', 'dot_general': 'dot_general',
         'add_bias': 'add', 'max_pool': 'reduce_window_max'}


@pytest.mark.parametrize('backend,mode', [('gpu', 'auto'), ('tpu', 'onednn'), ('cpu', 'xla')])
def test_primitives_are_the_plain_lax_calls_off_the_cpu_and_with_xla(monkeypatch, backend,
                                                                     mode):
    monkeypatch.setattr(jax, 'default_backend', lambda: backend)
    monkeypatch.setenv(switches.CPU_KERNELS_ENV, mode)
    for name, (forward, grad) in _jaxprs().items():
        assert PLAIN[name] in forward, (name, forward)
        for jaxpr in (forward, grad):
            assert 'custom_vjp' not in jaxpr and 'custom_call' not in jaxpr, (name, jaxpr)


def test_the_cpu_gets_its_lowerings_by_default(monkeypatch):
    monkeypatch.delenv(switches.CPU_KERNELS_ENV, raising=False)
    if jax.default_backend() != 'cpu':
        pytest.skip('the CPU lowerings')
    # conv: oneDNN's custom call or the tap matmuls, both with a custom gradient.
    for name, (forward, _) in _jaxprs().items():
        assert 'custom_vjp_call' in forward, (name, forward)


def test_primitives_agree_across_lowerings(monkeypatch):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 9, 16))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 8)) * 0.1
    b = jnp.arange(8.0)

    def net(x, k):
        y = kernels.add_bias(kernels.conv(x, k, (2, 2), PAD), b)
        y = kernels.max_pool(jax.nn.relu(y), (3, 3), (1, 1), PAD)
        return jnp.sum(jnp.sin(kernels.matmul(y, k[0, 0, :8])))

    results = {}
    for mode in switches.CPU_KERNELS[:1] + switches.CPU_KERNELS[2:]:   # auto, matmul, xla
        monkeypatch.setenv(switches.CPU_KERNELS_ENV, mode)
        results[mode] = jax.jit(jax.value_and_grad(lambda x, k: net(x, k), (0, 1)))(x, k)
    for mode, got in results.items():
        for a, want in zip(jax.tree.leaves(got), jax.tree.leaves(results['xla'])):
            np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-4, err_msg=mode)


@pytest.mark.parametrize('name,replacement', [('DETECTAX_ONEDNN', 'DETECTAX_CPU_KERNELS'),
                                              ('DETECTAX_MATMUL', 'DETECTAX_CPU_KERNELS'),
                                              ('DETECTAX_CONV_KERNEL_GRAD', 'DETECTAX_CPU_KERNELS'),
                                              ('DETECTAX_NATIVE_CACHE', 'XDG_CACHE_HOME')])
def test_retired_switches_name_their_replacement(monkeypatch, name, replacement):
    monkeypatch.setenv(name, 'off')
    with pytest.raises(ValueError, match=f'{name} is no longer read; use {replacement}'):
        kernels.matmul(jnp.ones((2, 3)), jnp.ones((3, 4)))
    if name == 'DETECTAX_NATIVE_CACHE':
        with pytest.raises(ValueError, match=replacement):
            switches.cache_dir()


def test_bad_values_are_named(monkeypatch):
    monkeypatch.setenv(switches.CPU_KERNELS_ENV, 'dots')
    with pytest.raises(ValueError, match="DETECTAX_CPU_KERNELS='dots'"):
        kernels.conv(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2)), (1, 1), ((0, 0), (0, 0)))
    monkeypatch.delenv(switches.CPU_KERNELS_ENV)
    with pytest.raises(ValueError, match="explicit .* padding, got 'SAME'"):
        kernels.conv(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2)), (1, 1), 'SAME')


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert switches.cache_dir() == str(tmp_path / 'detectax')
