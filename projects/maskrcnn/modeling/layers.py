"""Building blocks shared by the modeling files: norm layers and module wrappers.

The arithmetic underneath (convolutions, matmuls, bias, pooling) is the `kernels` package's
primitives, the same calls on every backend.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from projects.maskrcnn import kernels

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


class Conv(nn.Module):
    """A 2-D NHWC convolution and its bias, as the `kernels` primitives `conv` and `add_bias`.

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
        y = kernels.conv(x, kernel.astype(self.dtype), self.strides, self.padding)
        if bias is not None:
            y = kernels.add_bias(y, bias)
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


# Dense layers whose products are the `kernels.matmul` primitive.
dense = functools.partial(nn.Dense, kernel_init=xavier_init, dot_general=kernels.dot_general)


class Upsample2xConv(nn.Module):
    """2x2 transposed convolution with stride 2 (the mask head's upsampling).

    out[2i + a, 2j + b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] + bias[o],
    the arithmetic of PyTorch's ConvTranspose2d(k=2, s=2) with its weight
    [c, o, a, b] stored as kernel[a, b, c, o].
    """
    features: int
    dtype: Any = jnp.float32
    kernel_init: Any = msra_init

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param('kernel', self.kernel_init, (2, 2, x.shape[-1], self.features))
        bias = self.param('bias', nn.initializers.zeros, (self.features,))
        y = kernels.conv_transpose_2x2(x.astype(self.dtype), kernel.astype(self.dtype))
        return kernels.add_bias(y, bias)


# Max pooling of NHWC maps with explicit padding (the ResNet stem's 3x3/2 pool).
max_pool = kernels.max_pool
