"""ViTDet's simple feature pyramid: P2..P6 from one stride-16 map.

Follows Detectron2's `SimpleFeaturePyramid` with scale factors (4, 2, 1, 0.5)
and norm "LN" (read, not copied). From the backbone's map F [B, h, w, C]:

  P2 (s4):  ConvT(C -> C/2, 2x2 s2) -> LN -> GELU -> ConvT(C/2 -> C/4, 2x2 s2)
  P3 (s8):  ConvT(C -> C/2, 2x2 s2)
  P4 (s16): F
  P5 (s32): max pool 2x2 s2
then each level: conv 1x1 -> channels (no bias) -> LN, conv 3x3 -> channels
(no bias) -> LN, no activation; P6 is P5 subsampled by 2 (a kernel-1 stride-2
pool, Detectron2's LastLevelMaxPool). "LN" normalises each position over its
channels, eps 1e-6; the transposed convolutions use PyTorch's arithmetic
(`layers.Upsample2xConv`; flax's ConvTranspose would flip them).

Parameter names spell Detectron2's keys with '.' as '_' and the norm of a
conv as a sibling `<conv>_norm`:

  Detectron2                  Detectax (under the neck)
  simfp_2.0 / 2.1 / 2.3       simfp_2_0 (kernel, bias) / simfp_2_1 (scale, bias) / simfp_2_3
  simfp_2.4(.norm), 2.5       simfp_2_4 (kernel), simfp_2_4_norm (scale, bias), simfp_2_5, ...
  simfp_3.0, 3.1, 3.2         simfp_3_0, simfp_3_1(_norm), simfp_3_2(_norm)
  simfp_4.0, 4.1              simfp_4_0(_norm), simfp_4_1(_norm)
  simfp_5.1, 5.2              simfp_5_1(_norm), simfp_5_2(_norm)

Convolutions take PyTorch's default init (kaiming_uniform, a = sqrt(5));
transposed-conv biases start at zero.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from projects.maskrcnn.modeling import layers, registry

# PyTorch's default: U(+-1/sqrt(fan_in)); for a transposed conv torch's fan_in
# is out_channels * kh * kw, which flax calls fan_out of an HWIO kernel.
_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
_deconv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')


def _channel_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32, name=name)


@dataclasses.dataclass(frozen=True)
class SimpleFPNSpec:
    """channels: of every output level (256). top_block: 'maxpool' adds P6."""
    channels: int = 256
    top_block: str = 'maxpool'


class SimpleFPN(nn.Module):
    """[B, h, w, C] -> [P2, P3, P4, P5(, P6)], each [B, h_l, w_l, channels].

    Sizes follow PyTorch's: P2 4h x 4w, P3 2h x 2w, P5 floor(h/2), P6 ceil(h_5/2).
    """
    channels: int = 256
    top_block: str = 'maxpool'
    dtype: Any = jnp.float32

    def _conv_ln(self, x, kernel, name):
        y = layers.conv(self.channels, kernel, dtype=self.dtype, kernel_init=_conv_init,
                        name=name)(x)
        return _channel_norm(f'{name}_norm')(y).astype(self.dtype)

    def _deconv(self, x, features, name):
        return layers.Upsample2xConv(features, self.dtype, kernel_init=_deconv_init,
                                     name=name)(x)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> list[jnp.ndarray]:
        if getattr(x, 'ndim', None) != 4:
            raise ValueError('SimpleFPN expects one [B, h, w, C] map, got '
                             f'{getattr(x, "shape", type(x).__name__)}')
        if self.top_block not in ('maxpool', 'none'):
            raise ValueError(f"unknown SimpleFPN top_block {self.top_block!r}; "
                             "expected 'maxpool' or 'none'")
        c = x.shape[-1]
        x = x.astype(self.dtype)
        y = self._deconv(x, c // 2, 'simfp_2_0')
        y = nn.gelu(_channel_norm('simfp_2_1')(y), approximate=False).astype(self.dtype)
        p2 = self._deconv(y, c // 4, 'simfp_2_3')
        p3 = self._deconv(x, c // 2, 'simfp_3_0')
        p5 = layers.max_pool(x, (2, 2), (2, 2), ((0, 0), (0, 0)))
        outputs = []
        for level, (y, first) in ((2, (p2, 4)), (3, (p3, 1)), (4, (x, 0)), (5, (p5, 1))):
            y = self._conv_ln(y, 1, f'simfp_{level}_{first}')
            outputs.append(self._conv_ln(y, 3, f'simfp_{level}_{first + 1}'))
        if self.top_block == 'maxpool':
            outputs.append(outputs[-1][:, ::2, ::2])
        return outputs


class SimpleFPNNeck(SimpleFPN):
    """SimpleFPN as the detector's neck: reads the one map `in_feature` of the
    backbone's dict. Same parameters as `SimpleFPN`."""
    in_feature: str = 'last_feat'

    def __call__(self, features: dict[str, jnp.ndarray], train: bool = False
                 ) -> list[jnp.ndarray]:
        return super().__call__(features[self.in_feature], train)


def build(spec: SimpleFPNSpec, inputs: tuple[registry.FeatureMap, ...], dtype: Any
          ) -> SimpleFPNNeck:
    """A pyramid over the backbone's single stride-16 map (ViTDet's simple_fpn)."""
    if len(inputs) != 1 or inputs[0].stride != 16:
        raise ValueError("neck 'simple_fpn' needs a backbone with one map of stride 16; the "
                         f"backbone gives {[(m.name, m.stride) for m in inputs]}")
    return SimpleFPNNeck(channels=spec.channels, top_block=spec.top_block, dtype=dtype,
                         in_feature=inputs[0].name)


registry.register_neck('simple_fpn', SimpleFPNSpec, build)
