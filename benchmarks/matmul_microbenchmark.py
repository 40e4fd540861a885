r"""bfloat16 matmuls on the CPU: XLA's bfloat16-result dot against float32 accumulation.

  python -m benchmarks.matmul_microbenchmark --shapes=2048x1024x256,1024x12544x1024

XLA:CPU runs a bfloat16 x bfloat16 -> bfloat16 dot at about its float32 rate,
but a bfloat16 x bfloat16 -> float32 dot on the CPU's bfloat16 matrix units
(AMX, where the CPU has them) at several times that. The `kernels.matmul`
primitive takes the second form on the CPU backend, for the product and both
gradients (kernels/cpu.py). For each M x K x N shape this times the product and
the product with both gradients in float32, in bfloat16 as XLA computes it
(DETECTAX_CPU_KERNELS=xla) and through `kernels.matmul` (=auto), and reports
GFLOP/s and the bfloat16 results' largest difference from float32 arithmetic on
the same bfloat16 values.
"""

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from projects.maskrcnn import kernels
from projects.maskrcnn.kernels import host_memory


def define_flags() -> None:
    flags.DEFINE_list('shapes', ['2048x1024x256', '8192x256x256', '1024x12544x1024'],
                      'M x K x N products (rows, contraction, columns).')
    flags.DEFINE_integer('reps', 3, 'Timed runs (median).')


def _jit_in_mode(fn, mode: str):
    """jit(fn) traced with DETECTAX_CPU_KERNELS=mode (the choice is made at trace time)."""
    return timing.jit_with_env(fn, DETECTAX_CPU_KERNELS=mode)


def main(argv):
    del argv
    f = flags.FLAGS
    print(f'{"M x K x N":>18s} {"arithmetic":30s} {"product":>17s} {"with gradients":>20s} '
          f'{"max rel. diff":>14s}')
    for spec in f.shapes:
        m, k, n = (int(v) for v in spec.split('x'))
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        x32 = jax.random.normal(keys[0], (m, k)).astype(jnp.bfloat16).astype(jnp.float32)
        w32 = jax.random.normal(keys[1], (k, n)).astype(jnp.bfloat16).astype(jnp.float32)
        dy32 = jax.random.normal(keys[2], (m, n)).astype(jnp.bfloat16).astype(jnp.float32)
        # float32 arithmetic on the bfloat16 values: the reference for the differences.
        ref = jax.vjp(kernels.matmul, x32, w32)
        ref = (ref[0],) + ref[1](dy32)
        scale = [float(jnp.max(jnp.abs(r))) for r in ref]

        def with_grads(x, w, dy):
            out, vjp = jax.vjp(kernels.matmul, x, w)
            return (out,) + vjp(dy)

        flop = 2 * m * k * n
        for label, dtype, mode in (('float32', jnp.float32, 'xla'),
                                   ('bfloat16, XLA (=xla)', jnp.bfloat16, 'xla'),
                                   ('bfloat16, float32 sums (=auto)', jnp.bfloat16, 'auto')):
            x, w, dy = (a.astype(dtype) for a in (x32, w32, dy32))
            product, grads = _jit_in_mode(kernels.matmul, mode), _jit_in_mode(with_grads, mode)
            t_product = timing.median_seconds(product, x, w, reps=f.reps)
            t_grads = timing.median_seconds(grads, x, w, dy, reps=f.reps)
            diff = max(float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) / s
                       for got, want, s in zip(grads(x, w, dy), ref, scale))
            print(f'{spec:>18s} {label:30s} {1e3 * t_product:7.1f} ms {flop / t_product / 1e9:4.0f} '
                  f'GF/s {1e3 * t_grads:8.1f} ms {3 * flop / t_grads / 1e9:4.0f} GF/s '
                  f'{diff:14.1e}')
        np.testing.assert_array_less(diff, 2 ** -7)   # the =auto row: bfloat16 rounding only


if __name__ == '__main__':
    host_memory.keep_freed_memory()  # as benchmark.py and main.py do
    define_flags()
    app.run(main)
