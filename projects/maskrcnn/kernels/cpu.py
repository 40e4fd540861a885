"""XLA:CPU lowerings of the primitives: matmuls where XLA:CPU's own forms run slower.

Each was measured on a 2-core AVX-512/AMX CPU (BENCHMARKS.md, third to fifth rounds) and pays
there; kernels/__init__.py sends a primitive here on the CPU backend unless
DETECTAX_CPU_KERNELS=xla. Convolutions come here only where oneDNN does not run them
(no compiler, several devices, DETECTAX_CPU_KERNELS=matmul): this is the measured fallback.
- `matmul`: 16-bit operands multiplied with float32 sums, rounded once (dense layers, the
  mask head's 2x2 transposed convolution, 1x1 convolutions): XLA:CPU runs a bfloat16 dot with a float32
  result on the CPU's bfloat16 matrix units (AMX), one with a bfloat16 result at about the
  float32 rate (benchmarks/matmul_microbenchmark.py: 3-6x).
- `conv`: a 1x1 kernel as a `matmul` (float32 too: XLA:CPU's 1x1 convolution runs 1.3-6x
  slower than its dot); a larger kernel's kernel gradient as one matmul per kernel tap
  (XLA lowers it to a convolution whose window is the whole feature map, 3-8x slower); with
  16-bit operands and stride 1, the forward pass and the input gradient as one
  float32-accumulated matmul per tap too (1.4-4x faster than XLA's bfloat16 convolution;
  benchmarks/conv_grad_microbenchmark.py).
- `add_bias`: the bias gradient as a float32 matmul with a ones row (XLA:CPU rewrote that sum
  into a reduce-window loop, about 60 ms for a 2x128x128x256 map against 2 ms).
- `max_pool`: the maximum of the window's strided slices (XLA:CPU runs the reduce-window on
  one thread, one output at a time: 37 ms against 12 ms for the ResNet stem's pool).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

NHWC = ('NHWC', 'HWIO', 'NHWC')
LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _contract_last(x, w, precision=None, preferred_element_type=None):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


def row_major_transpose(x):
    """x [M, K] -> x^T [K, M], as a copy in row-major layout.

    XLA folds a plain transpose into the dot that consumes it, as a contraction
    over the rows, and XLA:CPU's YNNPACK dot takes only row-major operands, so a
    16-bit weight gradient ran upcast to float32 (an optimization barrier did not
    stop the folding). Transposed through a split of the rows the transpose stays
    a copy, and the dot is a row-major [K, M] @ [M, N] product on the matrix units:
    2.2-3.7x faster for bfloat16 weight gradients of 256-12544 channels
    (benchmarks/conv_grad_microbenchmark.py --dtype=bfloat16, matmul_microbenchmark).
    """
    m, k = x.shape
    split = 2 if m % 2 == 0 else 1
    return x.reshape(split, m // split, k).transpose(2, 0, 1).reshape(k, m)


@jax.custom_vjp
def _wide_accumulation_matmul(x, w):
    return _contract_last(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _wide_accumulation_matmul_fwd(x, w):
    return _wide_accumulation_matmul(x, w), (x, w)


def _wide_accumulation_matmul_bwd(residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    dx = lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(x.dtype)
    # dw = x^T dy, with x^T copied out row-major so that the dot is one the
    # matrix units take (see row_major_transpose).
    x_t = row_major_transpose(x.reshape(-1, x.shape[-1]))
    dw = lax.dot_general(x_t, dy.reshape(-1, dy.shape[-1]), (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_wide_accumulation_matmul.defvjp(_wide_accumulation_matmul_fwd, _wide_accumulation_matmul_bwd)


def matmul(x, w, precision=None):
    """x [..., K] @ w [K, N]; with 16-bit operands of one dtype the product and both
    gradients accumulate in float32 and round once, as a GPU's tensor cores do."""
    if x.dtype in LOW_PRECISION and w.dtype == x.dtype and w.ndim == 2:
        return _wide_accumulation_matmul(x, w)
    return _contract_last(x, w, precision)


def conv_transpose_2x2(x, kernel):
    """The 2x2 stride-2 transposed convolution (kernels.conv_transpose_2x2); with 16-bit
    operands one `matmul` [N, H, W, C] @ [C, (a, b, F)] for its float32 sums, else XLA's
    einsum (faster in float32 here: 24 against 31 ms forward and gradient, 64x14x14x32)."""
    if x.dtype in LOW_PRECISION and kernel.dtype == x.dtype:
        c, o = kernel.shape[2:]
        y = matmul(x, kernel.transpose(2, 0, 1, 3).reshape(c, 4 * o))
        n, h, w, _ = y.shape
        y = y.reshape(n, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5)
    else:
        y = jnp.einsum('nhwc,abco->nhawbo', x, kernel)
    n, h, _, w, _, o = y.shape
    return y.reshape(n, 2 * h, 2 * w, o)


def _kernel_taps(x, kernel_hw, strides, padding, out_hw):
    """The input windows seen by each kernel tap (a, b): x_pad[s*i + a, s*j + b]."""
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    return [lax.slice(xp, (0, a, b, 0),
                      (xp.shape[0], a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, xp.shape[3]),
                      (1, sh, sw, 1))
            for a in range(kh) for b in range(kw)]


def _conv_as_tap_dots(x, kernel, strides, padding):
    """A stride-1 convolution as one float32-accumulated matmul per kernel tap, rounded once.

    Each tap's matmul runs over the whole padded map, read in place: out[i, j] =
    sum over (a, b) of (x_pad @ kernel[a, b])[i + a, j + b], the shifts read by
    the fused sum. Slicing the input per tap instead made XLA copy each tap's
    window before its matmul (nine copies of the map); the padded rows and
    columns cost (H + kh - 1)(W + kw - 1) / HW - 1 more matmul work (3% at 128x128).
    """
    if tuple(strides) != (1, 1):
        raise ValueError(f'tap matmuls need stride 1, got {strides}')
    kh, kw = kernel.shape[:2]
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    n, hp, wp, c = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    rows = xp.reshape(n * hp * wp, c)
    acc = None
    for a in range(kh):
        for b in range(kw):
            y = _contract_last(rows, kernel[a, b], preferred_element_type=jnp.float32)
            y = y.reshape(n, hp, wp, -1)[:, a:a + ho, b:b + wo]
            acc = y if acc is None else acc + y
    return acc.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_tap_grad(x, kernel, strides, padding, tap_dots=False):
    if tap_dots:
        return _conv_as_tap_dots(x, kernel, strides, padding)
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _conv_tap_grad_fwd(x, kernel, strides, padding, tap_dots=False):
    return _conv_tap_grad(x, kernel, strides, padding, tap_dots), (x, kernel)


def _conv_tap_grad_bwd(strides, padding, tap_dots, residuals, dy):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    if tap_dots:
        # The input gradient of a stride-1 convolution is a convolution of dy
        # with the flipped, transposed kernel and the complementary padding.
        flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)
        pads = ((kh - 1 - padding[0][0], x.shape[1] + padding[0][0] - dy.shape[1]),
                (kw - 1 - padding[1][0], x.shape[2] + padding[1][0] - dy.shape[2]))
        dx = _conv_as_tap_dots(dy.astype(x.dtype), flipped, (1, 1), pads)
    else:
        _, input_vjp = jax.vjp(
            lambda v: lax.conv_general_dilated(v, kernel, strides, padding,
                                               dimension_numbers=NHWC), x)
        (dx,) = input_vjp(dy)
    # d kernel[a, b] = sum over n, i, j of x_pad[n, s*i + a, s*j + b]^T dy[n, i, j]:
    # one [C, N*H*W] @ [N*H*W, F] matmul per tap.
    dy2 = dy.reshape(-1, dy.shape[-1])
    taps = [t.reshape(-1, x.shape[-1])
            for t in _kernel_taps(x, kernel.shape[:2], strides, padding, dy.shape[1:3])]
    if tap_dots:
        # 16-bit: dy^T once, as a row-major copy, then [F, NHW] @ [NHW, C] per tap,
        # which runs on the matrix units (see row_major_transpose).
        dy_t = row_major_transpose(dy2.astype(x.dtype))
        grads = jnp.stack([lax.dot_general(dy_t, t, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)
                           for t in taps]).transpose(0, 2, 1)
    else:
        grads = jnp.stack([lax.dot_general(t, dy2, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)
                           for t in taps])
    dkernel = grads.reshape(kernel.shape).astype(kernel.dtype)
    return dx, dkernel


_conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


def conv(x, kernel, strides, padding):
    """x [N, H, W, C] (*) kernel [kh, kw, C, F] -> [N, Ho, Wo, F], explicit padding.

    A 1x1 kernel without padding is a (strided) slice and a `matmul`; a larger kernel
    on 16 or more input channels (enough to fill a matmul) gets its kernel gradient as
    tap matmuls, and with 16-bit operands and stride 1 its forward pass and input
    gradient too (strided taps are copies, measured slower than XLA's); otherwise XLA's.
    """
    same_dtype = kernel.dtype == x.dtype
    if kernel.shape[:2] == (1, 1) and all(v == 0 for p in padding for v in p) and same_dtype:
        sh, sw = strides
        if (sh, sw) != (1, 1):
            x = lax.slice(x, (0, 0, 0, 0), x.shape, (1, sh, sw, 1))
        return matmul(x, kernel[0, 0])
    if x.shape[-1] >= 16:
        tap_dots = x.dtype in LOW_PRECISION and same_dtype and tuple(strides) == (1, 1)
        return _conv_tap_grad(x, kernel, tuple(strides), padding, tap_dots)
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _bias_add(y, bias):
    return y + bias.astype(y.dtype)


@jax.custom_vjp
def add_bias(y, bias):
    """y [..., C] + bias [C], its bias gradient a float32 [1, M] @ [M, C] matmul."""
    return _bias_add(y, bias)


def _add_bias_fwd(y, bias):
    return _bias_add(y, bias), bias


def _add_bias_bwd(bias, dy):
    rows = dy.reshape(-1, dy.shape[-1])
    ones = jnp.ones((1, rows.shape[0]), rows.dtype)
    dbias = lax.dot_general(ones, rows, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)[0]
    return dy, dbias.astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def reduce_window_max_pool(x, window, strides, padding):
    """Max pooling of NHWC maps as XLA's reduce-window (padding never wins the max)."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1),
                             (1, *strides, 1), ((0, 0), *padding, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window, strides, padding):
    """Max pooling of NHWC maps as the maximum of its window's strided slices.

    The nine slices of a 3x3 window fuse into the loop that consumes them. The
    gradient is the reduce-window's (all of it to the first maximum of each window,
    as PyTorch's max_pool2d), not the slices' maxima's, which would split it among
    ties; it recomputes the pool (in the ResNet it runs only when the stem trains).
    """
    (ph, pw), (sh, sw), (kh, kw) = padding, strides, window
    xp = jnp.pad(x, ((0, 0), tuple(ph), tuple(pw), (0, 0)), constant_values=-jnp.inf)
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    return functools.reduce(jnp.maximum, [
        lax.slice(xp, (0, a, b, 0), (xp.shape[0], a + sh * (ho - 1) + 1,
                                     b + sw * (wo - 1) + 1, xp.shape[3]), (1, sh, sw, 1))
        for a in range(kh) for b in range(kw)])


def _max_pool_fwd(x, window, strides, padding):
    return max_pool(x, window, strides, padding), x


def _max_pool_bwd(window, strides, padding, x, dy):
    _, vjp = jax.vjp(lambda v: reduce_window_max_pool(v, window, strides, padding), x)
    return vjp(dy)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
