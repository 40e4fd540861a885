"""The primitives the model is built from, and where each backend's kernels come from.

`modeling/` calls only these six: `conv`, `conv_transpose_2x2`, `matmul`, `dot_general`
(for `nn.Dense`), `add_bias` and `max_pool`. Each is the plain `lax` call written below on every backend but
the CPU, and on the CPU with DETECTAX_CPU_KERNELS=xla; on the CPU by default a convolution
runs through oneDNN (onednn.py, onednn_conv.cc) and the rest through XLA:CPU lowerings that
run faster there (cpu.py). Every form computes the same function (float32 sums, rounded once
for 16-bit operands). The switches are read when a primitive is traced (switches.py,
BUILD_NOTES.md "Environment switches"), so a function jitted once keeps its lowering.

Like `jax.lax.conv_general_dilated`, one name on every backend, whatever runs underneath
(JAX's own primitives are the model followed here).
"""

import jax
from jax import lax
import jax.numpy as jnp

from projects.maskrcnn.kernels import cpu, onednn, switches

__all__ = ['conv', 'conv_transpose_2x2', 'matmul', 'dot_general', 'add_bias', 'max_pool']

NHWC = ('NHWC', 'HWIO', 'NHWC')
Padding = tuple[tuple[int, int], tuple[int, int]]


def _plain_lax() -> bool:
    """True off the CPU backend and with DETECTAX_CPU_KERNELS=xla: the `lax` calls below."""
    mode = switches.cpu_kernels()   # read on every backend, so a bad value is always named
    return mode == 'xla' or jax.default_backend() != 'cpu'


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding):
    """A 2-D convolution, x [N, H, W, C] (*) kernel [kh, kw, C, F] -> [N, Ho, Wo, F].

    Args:
        x: the input map, NHWC.
        kernel: HWIO, as `nn.Conv` stores it.
        strides: (sh, sw).
        padding: explicit ((top, bottom), (left, right)) zero padding.
    """
    if isinstance(padding, str):
        raise ValueError(f'conv takes explicit ((top, bottom), (left, right)) padding, '
                         f'got {padding!r}')
    if _plain_lax():
        return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)
    strides = tuple(int(s) for s in strides)
    padding = tuple(tuple(int(v) for v in pair) for pair in padding)
    if kernel.dtype == x.dtype and onednn.enabled(x.dtype):
        return onednn.conv(x, kernel, strides, padding)
    return cpu.conv(x, kernel, strides, padding)


def conv_transpose_2x2(x: jax.Array, kernel: jax.Array):
    """A 2x2 transposed convolution with stride 2, x [N, H, W, C] -> [N, 2H, 2W, F]:
    out[2i + a, 2j + b, o] = sum_c x[i, j, c] * kernel[a, b, c, o].

    Its windows do not overlap, so it is one product followed by depth-to-space
    (XLA's dilated-convolution form of it is many times slower on the CPU).
    """
    if _plain_lax():
        y = jnp.einsum('nhwc,abco->nhawbo', x, kernel)
        n, h, _, w, _, o = y.shape
        return y.reshape(n, 2 * h, 2 * w, o)
    return cpu.conv_transpose_2x2(x, kernel)


def matmul(x: jax.Array, w: jax.Array, precision=None):
    """x [..., K] @ w [K, N] -> [..., N] (16-bit operands: float32 sums, rounded once)."""
    if _plain_lax():
        return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return cpu.matmul(x, w, precision)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general`, for `nn.Dense(dot_general=...)`; its [..., K] @ [K, N] products
    are `matmul`s."""
    is_matmul = (preferred_element_type is None and rhs.ndim == 2
                 and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,))
                 and not any(dimension_numbers[1]))
    if _plain_lax() or not is_matmul:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    return cpu.matmul(lhs, rhs, precision)


def add_bias(y: jax.Array, bias: jax.Array):
    """y [..., C] + bias [C], in y's dtype."""
    if _plain_lax():
        return y + bias.astype(y.dtype)
    return cpu.add_bias(y, bias)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: Padding):
    """Max pooling of x [N, H, W, C] over `window` with explicit padding (never the max).

    The gradient goes to the first maximum of each window, as PyTorch's max_pool2d.
    """
    if _plain_lax():
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1),
                                 (1, *strides, 1), ((0, 0), *padding, (0, 0)))
    return cpu.max_pool(x, tuple(window), tuple(strides),
                        tuple(tuple(pair) for pair in padding))
