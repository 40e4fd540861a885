r"""A 3x3 convolution's kernel gradient on XLA:CPU: XLA's own form against nine matmuls.

  python -m benchmarks.conv_grad_microbenchmark --shape=256,14,14,256 --features=256

The profile of a Detectax training step on the CPU (benchmarks/profile_step.py)
puts the kernel gradients of 3x3 convolutions on top: XLA lowers each to a
convolution whose window is the whole feature map and whose feature axis is the
batch, a form XLA:CPU runs far below its matmul rate. The same gradient is the
sum over the nine taps of (shifted input)^T @ (output gradient), nine matmuls
that run at the matmul rate. This script times both, and the forward pass, on
one shape (default: the mask head's 2 images x 128 RoIs of 14x14x256).
"""

import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

_SHAPE = flags.DEFINE_list('shape', ['256', '14', '14', '256'], 'Input N,H,W,C.')
_FEATURES = flags.DEFINE_integer('features', 256, 'Output channels.')
_REPS = flags.DEFINE_integer('reps', 3, 'Timed runs (median).')


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def kernel_grad_xla(x, w, dy):
    return jax.vjp(lambda k: conv(x, k), w)[1](dy)[0]


def kernel_grad_taps(x, dy):
    """d(conv)/d(kernel) of a 3x3 SAME conv as nine [C, NHW] x [NHW, F] matmuls."""
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy2 = dy.reshape(-1, dy.shape[-1])
    taps = [xp[:, i:i + h, j:j + wd, :].reshape(-1, c).T @ dy2
            for i in range(3) for j in range(3)]
    return jnp.stack(taps).reshape(3, 3, c, dy.shape[-1])


def _time(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_REPS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    n, h, w, c = (int(s) for s in _SHAPE.value)
    f = _FEATURES.value
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (n, h, w, c))
    k = jax.random.normal(keys[1], (3, 3, c, f)) * 0.05
    dy = jax.random.normal(keys[2], (n, h, w, f))
    flops = 2 * n * h * w * 9 * c * f
    xla = jax.jit(kernel_grad_xla)
    taps = jax.jit(kernel_grad_taps)
    err = float(jnp.max(jnp.abs(xla(x, k, dy) - taps(x, dy))) / jnp.max(jnp.abs(xla(x, k, dy))))
    assert err < 1e-4, err
    for name, fn, args in (('forward conv', jax.jit(conv), (x, k)),
                           ('kernel grad, XLA', xla, (x, k, dy)),
                           ('kernel grad, 9 matmuls', taps, (x, dy))):
        t = _time(fn, *args)
        print(f'{name:24s} {t * 1e3:8.1f} ms  {flops / t / 1e9:6.1f} GFLOP/s')
    print(f'relative difference of the two gradients: {err:.1e}')


if __name__ == '__main__':
    app.run(main)
