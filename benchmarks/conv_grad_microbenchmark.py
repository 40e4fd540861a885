r"""One convolution layer on the CPU: XLA's lowering against the project's two.

  python -m benchmarks.conv_grad_microbenchmark --shape=2,128,128,256 --features=256 --kernel=3 --stride=1
  python -m benchmarks.conv_grad_microbenchmark ... --dtype=bfloat16

Where oneDNN does not run the convolutions, the `kernels.conv` primitive rewrites
them into matmuls where XLA:CPU runs those faster (kernels/cpu.py): a kernel gradient as one matmul
per kernel tap
(XLA lowers it to a convolution whose window is the whole feature map, far
below its matmul rate), a 1x1 convolution as a dot, and in bfloat16 a stride-1
convolution and its input gradient as float32-accumulated tap dots (which
XLA:CPU runs on the bfloat16 matrix units where the CPU has them). This script
times, on one layer shape, the forward convolution and the input gradient with
XLA's lowering (DETECTAX_CPU_KERNELS=xla) and with the project's matmul lowering
('Detectax', =matmul), and the kernel gradient both ways, and checks that the
kernel gradients agree. With the oneDNN kernels available
(projects/maskrcnn/kernels/onednn.py) it adds their rows (=onednn).
"""

from absl import app, flags
import jax
import jax.numpy as jnp

from benchmarks import timing
from projects.maskrcnn import kernels
from projects.maskrcnn.kernels import host_memory, onednn


def define_flags() -> None:
    flags.DEFINE_list('shape', ['256', '14', '14', '256'], 'Input N,H,W,C.')
    flags.DEFINE_integer('features', 256, 'Output channels.')
    flags.DEFINE_integer('kernel', 3, 'Kernel side.')
    flags.DEFINE_integer('stride', 1, 'Stride.')
    flags.DEFINE_integer('reps', 3, 'Timed runs (median).')
    flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Operand dtype.')


def _jit_in_mode(fn, mode: str):
    """jit(fn) traced with DETECTAX_CPU_KERNELS=mode (read at trace time)."""
    return timing.jit_with_env(fn, DETECTAX_CPU_KERNELS=mode)


def main(argv):
    del argv
    f = flags.FLAGS
    n, h, w, c = (int(s) for s in f.shape)
    k, s, p = f.kernel, f.stride, f.kernel // 2

    def conv(x, kernel):
        return kernels.conv(x, kernel, (s, s), ((p, p), (p, p)))

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    dtype = jnp.dtype(f.dtype)
    x = jax.random.normal(keys[0], (n, h, w, c)).astype(dtype)
    kernel = (jax.random.normal(keys[1], (k, k, c, f.features)) * 0.05).astype(dtype)
    y = jax.jit(conv)(x, kernel)
    dy = jax.random.normal(keys[2], y.shape).astype(dtype)
    flops = 2 * y.size * k * k * c
    kernel_grad = lambda x, kernel, dy: jax.vjp(lambda v: conv(x, v), kernel)[1](dy)[0]  # noqa: E731
    input_grad = lambda x, kernel, dy: jax.vjp(lambda v: conv(v, kernel), x)[1](dy)[0]  # noqa: E731
    # Detectax's kernel gradient as the model gets it: tap matmuls, and with 16-bit
    # operands and stride 1, dy^T copied out row-major (kernels/cpu.py: row_major_transpose).
    xla, taps = _jit_in_mode(kernel_grad, 'xla'), _jit_in_mode(kernel_grad, 'matmul')
    reference = xla(x, kernel, dy)
    as_f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    err = float(jnp.max(jnp.abs(as_f32(reference) - as_f32(taps(x, kernel, dy))))
                / jnp.max(jnp.abs(as_f32(reference))))
    # float32: the same sums in another order; bfloat16: XLA's sums are not all float32.
    assert err < (1e-4 if dtype == jnp.float32 else 2 ** -6), err
    print(f'input {n}x{h}x{w}x{c}, {k}x{k} stride {s} -> {f.features}, {f.dtype}: '
          f'{flops / 1e9:.2f} GFLOP each')
    rows = [('forward conv, XLA', _jit_in_mode(conv, 'xla'), (x, kernel)),
            ('forward conv, Detectax', _jit_in_mode(conv, 'matmul'), (x, kernel)),
            ('input grad, XLA', _jit_in_mode(input_grad, 'xla'), (x, kernel, dy)),
            ('input grad, Detectax', _jit_in_mode(input_grad, 'matmul'), (x, kernel, dy))]
    rows += [('kernel grad, XLA', xla, (x, kernel, dy)),
             ('kernel grad, Detectax', taps, (x, kernel, dy))]
    if onednn.status().available and f.dtype in onednn.status().dtypes:
        in_onednn = lambda fn: _jit_in_mode(fn, 'onednn')  # noqa: E731
        dnnl_grad = in_onednn(kernel_grad)
        derr = float(jnp.max(jnp.abs(as_f32(reference) - as_f32(dnnl_grad(x, kernel, dy))))
                     / jnp.max(jnp.abs(as_f32(reference))))
        assert derr < (1e-4 if dtype == jnp.float32 else 2 ** -6), derr
        rows += [('forward conv, oneDNN', in_onednn(conv), (x, kernel)),
                 ('input grad, oneDNN', in_onednn(input_grad), (x, kernel, dy)),
                 ('kernel grad, oneDNN', dnnl_grad, (x, kernel, dy))]
        print("'Detectax' rows: the project's matmul lowering (DETECTAX_CPU_KERNELS=matmul); "
              "'oneDNN' rows: {} thread(s) for the forward call, {} for each gradient call "
              '(DETECTAX_ONEDNN_THREADS)'.format(*onednn.threads()))
    else:
        derr = None
        print(f'(no oneDNN rows: {onednn.status().reason or "no " + f.dtype + " kernels"})')
    for name, fn, args in rows:
        t = timing.median_seconds(fn, *args, reps=f.reps)
        print(f'{name:26s} {t * 1e3:8.1f} ms  {flops / t / 1e9:6.1f} GFLOP/s')
    print(f'relative difference of the kernel gradients from XLA\'s: Detectax {err:.1e}'
          + ('' if derr is None else f', oneDNN {derr:.1e}'))


if __name__ == '__main__':
    host_memory.keep_freed_memory()  # as benchmark.py and main.py do
    define_flags()
    app.run(main)
