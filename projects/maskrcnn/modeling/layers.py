"""Building blocks shared by the modeling files: convolutions and norm layers."""

import functools
import os
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from projects.maskrcnn.native import onednn

# Initialisers of the Caffe2/Detectron2 lineage: "MSRA" (He normal, fan_out)
# for ReLU convolutions, "Xavier" (uniform, fan_in, gain 1) for FPN and FC layers.
msra_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
xavier_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')

NORMS = ('bn', 'frozen_bn', 'gn', 'ln', 'none')


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine terms (pretrained backbones).

    The four arrays live in the `frozen` collection: the optimiser never sees
    them and checkpoint converters fill them from `running_mean` etc.
    """
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.variable('frozen', 'scale', jnp.ones, (c,), jnp.float32).value
        bias = self.variable('frozen', 'bias', jnp.zeros, (c,), jnp.float32).value
        mean = self.variable('frozen', 'mean', jnp.zeros, (c,), jnp.float32).value
        var = self.variable('frozen', 'var', jnp.ones, (c,), jnp.float32).value
        mult = scale / jnp.sqrt(var + self.epsilon)
        return x * mult.astype(x.dtype) + (bias - mean * mult).astype(x.dtype)


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest number of groups <= max_groups that divides `channels`."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def make_norm(norm: str, train: bool, dtype: Any, name: str, zero_init: bool = False,
              eps: float = 1e-5):
    """A norm layer by name: 'bn' (trainable, batch statistics over the whole
    global batch under jit, i.e. SyncBN), 'frozen_bn', 'gn' (32 groups), 'ln'
    (LayerNorm over the channels at each position, eps 1e-6 as Detectron2's), 'none'.
    `eps` is the batch-norm epsilon (both kinds)."""
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    if norm == 'bn':
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=eps,
                            dtype=dtype, scale_init=scale_init, name=name)
    if norm == 'frozen_bn':
        return FrozenBatchNorm(epsilon=eps, name=name)
    if norm == 'gn':
        return lambda x: nn.GroupNorm(num_groups=group_count(x.shape[-1]), epsilon=1e-5,
                                      dtype=dtype, scale_init=scale_init, name=name)(x)
    if norm == 'ln':
        return nn.LayerNorm(epsilon=1e-6, dtype=dtype, scale_init=scale_init, name=name)
    if norm == 'none':
        return lambda x: x
    raise ValueError(f'unknown norm {norm!r}; expected one of {NORMS}')


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_tap_grad(x, kernel, strides, padding, precision, tap_dots=False):
    if tap_dots:
        return _conv_as_tap_dots(x, kernel, strides, padding)
    return lax.conv_general_dilated(x, kernel, strides, padding, precision=precision,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv_tap_grad_fwd(x, kernel, strides, padding, precision, tap_dots=False):
    return _conv_tap_grad(x, kernel, strides, padding, precision, tap_dots), (x, kernel)


def _conv_tap_grad_bwd(strides, padding, precision, tap_dots, residuals, dy):
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
            lambda v: lax.conv_general_dilated(v, kernel, strides, padding, precision=precision,
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC')), x)
        (dx,) = input_vjp(dy)
    # d kernel[a, b] = sum over n, i, j of x_pad[n, s*i + a, s*j + b]^T dy[n, i, j]:
    # one [C, N*H*W] @ [N*H*W, F] matmul per tap.
    dy2 = dy.reshape(-1, dy.shape[-1])
    taps = [t.reshape(-1, x.shape[-1])
            for t in _kernel_taps(x, kernel.shape[:2], strides, padding, dy.shape[1:3])]
    if tap_dots:
        # 16-bit: dy^T once, as a row-major copy, then [F, NHW] @ [NHW, C] per tap,
        # which runs on the matrix units (see _row_major_transpose).
        dy_t = _row_major_transpose(dy2.astype(x.dtype))
        grads = jnp.stack([lax.dot_general(dy_t, t, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)
                           for t in taps]).transpose(0, 2, 1)
    else:
        grads = jnp.stack([lax.dot_general(t, dy2, (((0,), (0,)), ((), ())), precision=precision,
                                           preferred_element_type=jnp.float32)
                           for t in taps])
    dkernel = grads.reshape(kernel.shape).astype(kernel.dtype)
    return dx, dkernel


_conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)

CONV_KERNEL_GRADS = ('auto', 'xla', 'taps')
# Where the gradient of a convolution's kernel comes from; see conv_general_dilated.
_KERNEL_GRAD_ENV = 'DETECTAX_CONV_KERNEL_GRAD'
MATMUL_MODES = ('auto', 'xla', 'dots')
# How 1x1 convolutions and dense layers are lowered; see `matmul`.
_MATMUL_ENV = 'DETECTAX_MATMUL'


def _env_mode(name: str, modes: tuple[str, ...]) -> str:
    mode = os.environ.get(name, 'auto')
    if mode not in modes:
        raise ValueError(f'{name}={mode!r}; expected one of {modes}')
    return mode


def _use_dots() -> bool:
    mode = _env_mode(_MATMUL_ENV, MATMUL_MODES)
    return mode == 'dots' or (mode == 'auto' and jax.default_backend() == 'cpu')


_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _contract_last(x, w, precision=None, preferred_element_type=None):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


def _row_major_transpose(x):
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
    # matrix units take (see _row_major_transpose).
    x_t = _row_major_transpose(x.reshape(-1, x.shape[-1]))
    dw = lax.dot_general(x_t, dy.reshape(-1, dy.shape[-1]), (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_wide_accumulation_matmul.defvjp(_wide_accumulation_matmul_fwd, _wide_accumulation_matmul_bwd)


def matmul(x, w, precision=None):
    """x [..., K] @ w [K, N], with float32 accumulation for 16-bit operands on CPU.

    XLA:CPU runs a bfloat16 matmul whose result is bfloat16 at about the float32
    rate, but one with a float32 result on the CPU's bfloat16 matrix units
    (AMX) at 3-6x that (benchmarks/matmul_microbenchmark.py). The weight
    gradient, a contraction over the rows, is computed from a row-major copy of
    x^T (`_row_major_transpose`), since XLA upcasts the folded form. With 16-bit
    operands and the dot lowering on (DETECTAX_MATMUL=auto on the CPU backend,
    or =dots), the product and both of its gradients accumulate in float32 and
    round once to the operands' dtype, as a GPU's tensor cores do. Otherwise it
    is `lax.dot_general`.
    """
    if x.dtype in _LOW_PRECISION and w.dtype == x.dtype and w.ndim == 2 and _use_dots():
        return _wide_accumulation_matmul(x, w)
    return _contract_last(x, w, precision)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense`: its [..., K] @ [K, N] products go through `matmul`."""
    if (preferred_element_type is None and rhs.ndim == 2
            and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,))
            and not any(dimension_numbers[1])):
        return matmul(lhs, rhs, precision)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """`lax.conv_general_dilated`, through oneDNN or rewritten into matmuls on CPU.

    A plain NHWC convolution (no dilation or groups, explicit padding) with
    same-dtype float32 or bfloat16 operands runs through oneDNN's convolutions
    where `native.onednn.enabled` says so (DETECTAX_ONEDNN; by default on the
    CPU backend where the kernels build): forward, input and kernel gradients,
    1.0-1.5x XLA's speed in float32 and 2-9x in bfloat16
    (benchmarks/conv_grad_microbenchmark.py). Otherwise, for plain convolutions:
    - a 1x1 kernel without padding is a (strided) slice and a `matmul`
      (DETECTAX_MATMUL): in float32 a plain dot, whose forward pass XLA:CPU
      runs 1.3-6x faster than its 1x1 convolution (most for few output
      channels, as the RPN and mask predictors have); with 16-bit operands a
      float32-accumulated dot, which runs on the bfloat16 matrix units, unlike
      XLA's bfloat16 convolution;
    - a larger kernel's kernel gradient is one matmul per kernel tap: XLA
      lowers that gradient to a convolution whose window is the whole feature
      map, which XLA:CPU runs 3-8x slower (benchmarks/conv_grad_microbenchmark.py).
      This needs enough input channels to fill a matmul (16).
      DETECTAX_CONV_KERNEL_GRAD=xla|taps overrides the 'auto' choice (the CPU
      backend). In float32 the forward pass and input gradient stay XLA's; with
      16-bit operands, stride 1 and the dot lowering (DETECTAX_MATMUL) the
      forward pass and the input gradient are one float32-accumulated dot per
      tap as well, 1.4-4x faster than XLA's bfloat16 convolution on the CPU's
      matrix units (3x3, 256 channels, 14x14 to 128x128 maps,
      conv_grad_microbenchmark --dtype=bfloat16).
    """
    mode = _env_mode(_KERNEL_GRAD_ENV, CONV_KERNEL_GRADS)
    plain = (lhs.ndim == 4 and feature_group_count == 1 and not kwargs
             and all(d in (None, (1, 1)) for d in (lhs_dilation, rhs_dilation))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
             and not isinstance(padding, str))
    if plain and rhs.dtype == lhs.dtype and onednn.enabled(lhs.dtype):
        return onednn.conv(lhs, rhs, tuple(int(s) for s in window_strides),
                           tuple(tuple(int(v) for v in pair) for pair in padding))
    if (plain and rhs.shape[:2] == (1, 1) and all(int(v) == 0 for p in padding for v in p)
            and rhs.dtype == lhs.dtype and _use_dots()):
        sh, sw = window_strides
        x = lhs if (sh, sw) == (1, 1) else lax.slice(lhs, (0, 0, 0, 0), lhs.shape,
                                                        (1, sh, sw, 1))
        return matmul(x, rhs[0, 0], precision)
    use_taps = mode == 'taps' or (mode == 'auto' and jax.default_backend() == 'cpu')
    if plain and use_taps and lhs.shape[-1] >= 16:
        padding = tuple(tuple(int(v) for v in pair) for pair in padding)
        # Stride 1 only: strided taps are copies, and measured slower than XLA's.
        tap_dots = (lhs.dtype in _LOW_PRECISION and rhs.dtype == lhs.dtype and _use_dots()
                    and tuple(window_strides) == (1, 1))
        return _conv_tap_grad(lhs, rhs, tuple(window_strides), padding, precision, tap_dots)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)


def _bias_add(y, bias):
    return y + bias.astype(y.dtype)


def add_bias(y, bias):
    """y + bias over the last axis; with the dot lowering (`_use_dots`), the bias
    gradient is a float32 matmul with a ones row.

    XLA:CPU rewrote the bias gradient, a sum over every row of a feature map, into
    a reduce-window loop that took about 60 ms for a 2x128x128x256 map inside the
    training step (the same sum alone takes 2 ms); [1, M] @ [M, C] runs as a dot.
    """
    return _dot_grad_bias_add(y, bias) if _use_dots() else _bias_add(y, bias)


@jax.custom_vjp
def _dot_grad_bias_add(y, bias):
    return _bias_add(y, bias)


def _add_bias_fwd(y, bias):
    return _bias_add(y, bias), bias


def _add_bias_bwd(bias, dy):
    rows = dy.reshape(-1, dy.shape[-1])
    ones = jnp.ones((1, rows.shape[0]), rows.dtype)
    dbias = lax.dot_general(ones, rows, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)[0]
    return dy, dbias.astype(bias.dtype)


_dot_grad_bias_add.defvjp(_add_bias_fwd, _add_bias_bwd)


class Conv(nn.Module):
    """A 2-D NHWC convolution through `conv_general_dilated`, with its bias added by `add_bias`.

    Its parameters are `nn.Conv`'s (`kernel` [kh, kw, in, out] and `bias` [out]),
    so checkpoints and converted weights are the same. Leading batch dimensions
    beyond one are flattened.
    """
    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    use_bias: bool = False
    dtype: Any = jnp.float32
    kernel_init: Any = msra_init
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param('kernel', self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features))
        bias = self.param('bias', self.bias_init, (self.features,)) if self.use_bias else None
        lead = x.shape[:-3]
        x = x.reshape((-1, *x.shape[-3:])).astype(self.dtype)
        y = conv_general_dilated(x, kernel.astype(self.dtype), self.strides, self.padding,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        if bias is not None:
            y = add_bias(y, bias)
        return y.reshape(*lead, *y.shape[1:])


def conv(features: int, kernel: int, stride: int = 1, *, use_bias: bool = False,
         dtype: Any = jnp.float32, kernel_init=msra_init, name: str | None = None):
    """A convolution with PyTorch's symmetric padding (k // 2 on each side).

    Flax's 'SAME' pads stride-2 convolutions asymmetrically; explicit padding
    keeps feature maps aligned with the reference implementations.
    """
    pad = kernel // 2
    return Conv(features, (kernel, kernel), strides=(stride, stride),
                padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                kernel_init=kernel_init, name=name)


# Dense layers whose products go through `matmul` (float32 accumulation of bfloat16 on CPU).
dense = functools.partial(nn.Dense, kernel_init=xavier_init, dot_general=dense_dot_general)


class Upsample2xConv(nn.Module):
    """2x2 transposed convolution with stride 2 (the mask head's upsampling).

    Its windows do not overlap, so it is one matmul followed by depth-to-space:
    out[2i + a, 2j + b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] + bias[o],
    the arithmetic of PyTorch's ConvTranspose2d(k=2, s=2) with its weight
    [c, o, a, b] stored as kernel[a, b, c, o]. (XLA's dilated-convolution path
    for the same op is many times slower on CPU.)
    """
    features: int
    dtype: Any = jnp.float32
    kernel_init: Any = msra_init

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param('kernel', self.kernel_init, (2, 2, x.shape[-1], self.features))
        bias = self.param('bias', nn.initializers.zeros, (self.features,))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if x.dtype in _LOW_PRECISION:  # through `matmul`, for its float32 accumulation
            c, o = x.shape[-1], self.features
            y = matmul(x, kernel.transpose(2, 0, 1, 3).reshape(c, 4 * o))  # [n, h, w, (a, b, o)]
            n, h, w, _ = y.shape
            y = y.reshape(n, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5)
        else:
            y = jnp.einsum('nhwc,abco->nhawbo', x, kernel)
        n, h, _, w, _, o = y.shape
        y = y.reshape(n, 2 * h, 2 * w, o)
        return add_bias(y, bias)


def _reduce_window_max_pool(x, window, strides, padding):
    return nn.max_pool(x, window, strides=strides, padding=padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]):
    """`nn.max_pool` over NHWC maps (explicit padding), as the maximum of its
    window's strided slices.

    XLA:CPU runs the reduce-window on one thread, one output at a time: 37 ms
    for the ResNet stem's 3x3/2 pool of a 2x256x256x64 map in the bfloat16
    training step (benchmarks/profile_step --by=op); the nine slices fuse into
    the loop that consumes them (about 12 ms there). The gradient is the
    reduce-window's (all of it to the first maximum of each window, as
    PyTorch's max_pool2d), not the nine maxima's, which would split it among ties;
    it recomputes the pool (in the ResNet it runs only when the stem trains, freeze_at=0).
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
    _, vjp = jax.vjp(lambda v: _reduce_window_max_pool(v, window, strides, padding), x)
    return vjp(dy)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
