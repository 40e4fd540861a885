r"""A convolution's kernel gradient on the CPU: XLA's own form against the project's tap matmuls.

  python -m benchmarks.conv_grad_microbenchmark --shape=2,128,128,256 --features=256 --kernel=3 --stride=1
  python -m benchmarks.conv_grad_microbenchmark ... --dtype=bfloat16

The profile of a Detectax training step on the CPU (benchmarks/profile_step.py)
put the kernel gradients of convolutions on top: XLA lowers each to a
convolution whose window is the whole feature map, a form XLA:CPU runs far below
its matmul rate. modeling/layers.py computes the same gradient as one matmul per
kernel tap. This script times, on one layer shape, the forward convolution, the
input gradient and the kernel gradient both ways (DETECTAX_CONV_KERNEL_GRAD=xla
and =taps around the same `layers.conv_general_dilated`), and checks that the
two kernel gradients agree. With `--dtype=bfloat16` it also times the forward
convolution and the input gradient as XLA's bfloat16 convolution
(DETECTAX_MATMUL=xla) against the float32-accumulated tap dots (=dots), which
XLA:CPU runs on the bfloat16 matrix units where the CPU has them.
"""

from absl import app, flags
import jax
import jax.numpy as jnp

from benchmarks import timing
from projects.maskrcnn.modeling import layers


def define_flags() -> None:
    flags.DEFINE_list('shape', ['256', '14', '14', '256'], 'Input N,H,W,C.')
    flags.DEFINE_integer('features', 256, 'Output channels.')
    flags.DEFINE_integer('kernel', 3, 'Kernel side.')
    flags.DEFINE_integer('stride', 1, 'Stride.')
    flags.DEFINE_integer('reps', 3, 'Timed runs (median).')
    flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Operand dtype.')


def _jit_in_mode(fn, mode: str):
    """jit(fn) traced with DETECTAX_CONV_KERNEL_GRAD=mode (the choice is made at trace time)."""
    return timing.jit_with_env(fn, 'DETECTAX_CONV_KERNEL_GRAD', mode)


def main(argv):
    del argv
    f = flags.FLAGS
    n, h, w, c = (int(s) for s in f.shape)
    k, s, p = f.kernel, f.stride, f.kernel // 2

    def conv(x, kernel):
        return layers.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    dtype = jnp.dtype(f.dtype)
    x = jax.random.normal(keys[0], (n, h, w, c)).astype(dtype)
    kernel = (jax.random.normal(keys[1], (k, k, c, f.features)) * 0.05).astype(dtype)
    y = jax.jit(conv)(x, kernel)
    dy = jax.random.normal(keys[2], y.shape).astype(dtype)
    flops = 2 * y.size * k * k * c
    kernel_grad = lambda x, kernel, dy: jax.vjp(lambda v: conv(x, v), kernel)[1](dy)[0]  # noqa: E731
    input_grad = lambda x, kernel, dy: jax.vjp(lambda v: conv(v, kernel), x)[1](dy)[0]  # noqa: E731
    xla, taps = _jit_in_mode(kernel_grad, 'xla'), _jit_in_mode(kernel_grad, 'taps')
    reference = xla(x, kernel, dy)
    as_f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    err = float(jnp.max(jnp.abs(as_f32(reference) - as_f32(taps(x, kernel, dy))))
                / jnp.max(jnp.abs(as_f32(reference))))
    # float32: the same sums in another order; bfloat16: XLA's sums are not all float32.
    assert err < (1e-4 if dtype == jnp.float32 else 2 ** -6), err
    print(f'input {n}x{h}x{w}x{c}, {k}x{k} stride {s} -> {f.features}, {f.dtype}: '
          f'{flops / 1e9:.2f} GFLOP each')
    rows = [('forward conv', _jit_in_mode(conv, 'xla'), (x, kernel)),
            ('input grad', _jit_in_mode(input_grad, 'xla'), (x, kernel, dy))]
    if dtype != jnp.float32:
        # The forward pass and input gradient with and without the tap dots.
        dots = lambda fn, mode: timing.jit_with_env(fn, 'DETECTAX_MATMUL', mode)  # noqa: E731
        rows = [('forward conv, XLA', dots(conv, 'xla'), (x, kernel)),
                ('forward conv, tap dots', dots(conv, 'dots'), (x, kernel)),
                ('input grad, XLA', dots(input_grad, 'xla'), (x, kernel, dy)),
                ('input grad, tap dots', dots(input_grad, 'dots'), (x, kernel, dy))]
    for name, fn, args in rows + [('kernel grad, XLA', xla, (x, kernel, dy)),
                                  ('kernel grad, tap matmuls', taps, (x, kernel, dy))]:
        t = timing.median_seconds(fn, *args, reps=f.reps)
        print(f'{name:26s} {t * 1e3:8.1f} ms  {flops / t / 1e9:6.1f} GFLOP/s')
    print(f'relative difference of the two kernel gradients: {err:.1e}')


if __name__ == '__main__':
    define_flags()
    app.run(main)
