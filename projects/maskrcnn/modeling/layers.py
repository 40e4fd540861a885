"""Building blocks shared by the modeling files: convolutions and norm layers."""

import functools
import os
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

# Initialisers of the Caffe2/Detectron2 lineage: "MSRA" (He normal, fan_out)
# for ReLU convolutions, "Xavier" (uniform, fan_in, gain 1) for FPN and FC layers.
msra_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
xavier_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')

NORMS = ('bn', 'frozen_bn', 'gn', 'none')


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
    global batch under jit, i.e. SyncBN), 'frozen_bn', 'gn' (32 groups), 'none'.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_tap_grad(x, kernel, strides, padding, precision):
    return lax.conv_general_dilated(x, kernel, strides, padding, precision=precision,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv_tap_grad_fwd(x, kernel, strides, padding, precision):
    return _conv_tap_grad(x, kernel, strides, padding, precision), (x, kernel)


def _conv_tap_grad_bwd(strides, padding, precision, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(
        lambda v: lax.conv_general_dilated(v, kernel, strides, padding, precision=precision,
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC')), x)
    (dx,) = input_vjp(dy)
    # d kernel[a, b] = sum over n, i, j of x_pad[n, s*i + a, s*j + b]^T dy[n, i, j]:
    # one [C, N*H*W] @ [N*H*W, F] matmul per tap.
    dy2 = dy.reshape(-1, dy.shape[-1])
    taps = _kernel_taps(x, kernel.shape[:2], strides, padding, dy.shape[1:3])
    grads = [lax.dot_general(t.reshape(-1, x.shape[-1]), dy2, (((0,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
             for t in taps]
    dkernel = jnp.stack(grads).reshape(kernel.shape).astype(kernel.dtype)
    return dx, dkernel


_conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)

CONV_KERNEL_GRADS = ('auto', 'xla', 'taps')
# Where the gradient of a convolution's kernel comes from; see conv_general_dilated.
_KERNEL_GRAD_ENV = 'DETECTAX_CONV_KERNEL_GRAD'


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """`lax.conv_general_dilated` whose kernel gradient is a sum of tap matmuls on CPU.

    XLA lowers a convolution's kernel gradient to a convolution whose window is
    the whole feature map; XLA:CPU runs that form 3-8x slower than the matmuls
    that compute the same numbers (benchmarks/conv_grad_microbenchmark.py). For
    plain NHWC convolutions with enough input channels to fill a matmul, this
    keeps XLA's forward pass and input gradient and computes the kernel gradient
    as one matmul per kernel tap. 'auto' does so on the CPU backend only; the
    environment variable DETECTAX_CONV_KERNEL_GRAD=xla|taps overrides it.
    """
    mode = os.environ.get(_KERNEL_GRAD_ENV, 'auto')
    if mode not in CONV_KERNEL_GRADS:
        raise ValueError(f'{_KERNEL_GRAD_ENV}={mode!r}; expected one of {CONV_KERNEL_GRADS}')
    plain = (lhs.ndim == 4 and feature_group_count == 1 and not kwargs
             and all(d in (None, (1, 1)) for d in (lhs_dilation, rhs_dilation))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
             and not isinstance(padding, str) and lhs.shape[-1] >= 16)
    use_taps = mode == 'taps' or (mode == 'auto' and jax.default_backend() == 'cpu')
    if plain and use_taps:
        padding = tuple(tuple(int(v) for v in pair) for pair in padding)
        return _conv_tap_grad(lhs, rhs, tuple(window_strides), padding, precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)


def conv(features: int, kernel: int, stride: int = 1, *, use_bias: bool = False,
         dtype: Any = jnp.float32, kernel_init=msra_init, name: str | None = None):
    """A convolution with PyTorch's symmetric padding (k // 2 on each side).

    Flax's 'SAME' pads stride-2 convolutions asymmetrically; explicit padding
    keeps feature maps aligned with the reference implementations.
    """
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                   kernel_init=kernel_init, conv_general_dilated=conv_general_dilated,
                   name=name)


dense = functools.partial(nn.Dense, kernel_init=xavier_init)


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
        y = jnp.einsum('nhwc,abco->nhawbo', x.astype(self.dtype), kernel.astype(self.dtype))
        n, h, _, w, _, o = y.shape
        return y.reshape(n, 2 * h, 2 * w, o) + bias.astype(self.dtype)
