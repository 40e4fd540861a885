"""Feature Pyramid Network (Lin et al. 2017): C2..C5 -> P2..P6.

Lateral 1x1 convs, nearest-neighbour top-down pathway, 3x3 output convs;
P6 is a stride-2 subsampling of P5 (Detectron2's LastLevelMaxPool).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from projects.maskrcnn.modeling import registry
from projects.maskrcnn.modeling.layers import conv, make_norm, xavier_init


@dataclasses.dataclass(frozen=True)
class FPNSpec:
    """`config.model.neck` with name 'fpn' (see `FPN`)."""
    channels: int = 256
    norm: str = 'none'


def upsample2x(x: jnp.ndarray, target_hw: tuple[int, int]) -> jnp.ndarray:
    """Nearest-neighbour 2x upsampling, cropped to the finer map's size."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, :target_hw[0], :target_hw[1]]


class FPN(nn.Module):
    """Attributes:
      channels: output channels of every level (256).
      norm: norm after lateral and output convs ('none' as in the paper, or 'gn').
      top_block: 'maxpool' adds P6 from P5; 'none' stops at P5.
      in_features: the input maps' keys, finest first, each twice the stride of the
        one before; () takes every key in sorted order (c2..c5).
    """
    channels: int = 256
    norm: str = 'none'
    top_block: str = 'maxpool'
    in_features: tuple[str, ...] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict[str, jnp.ndarray], train: bool = False
                 ) -> list[jnp.ndarray]:
        """Returns [P2, P3, P4, P5(, P6)], each [B, H_l, W_l, channels]."""
        names = list(self.in_features) or sorted(features)  # c2 .. c5
        use_bias = self.norm == 'none'
        laterals = []
        for name in names:
            y = conv(self.channels, 1, use_bias=use_bias, dtype=self.dtype,
                     kernel_init=xavier_init, name=f'lateral_{name}')(features[name])
            laterals.append(make_norm(self.norm, train, self.dtype, f'lateral_norm_{name}')(y))
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + upsample2x(merged[0], lateral.shape[1:3]))
        outputs = []
        for name, x in zip(names, merged):
            y = conv(self.channels, 3, use_bias=use_bias, dtype=self.dtype,
                     kernel_init=xavier_init, name=f'output_{name}')(x)
            outputs.append(make_norm(self.norm, train, self.dtype, f'output_norm_{name}')(y))
        if self.top_block == 'maxpool':
            outputs.append(outputs[-1][:, ::2, ::2])  # max pool with a 1x1 window
        elif self.top_block != 'none':
            raise ValueError(f'unknown FPN top_block {self.top_block!r}')
        return outputs


def build(spec: FPNSpec, inputs: tuple[registry.FeatureMap, ...], dtype: Any) -> FPN:
    """An FPN over every declared input map, which must double in stride from
    stride 4 (P2) on, as the RPN's anchors and the RoI heads' levels expect."""
    inputs = sorted(inputs, key=lambda m: m.stride)
    strides = [m.stride for m in inputs]
    if strides != [4 * 2 ** i for i in range(len(inputs))]:
        raise ValueError(f"neck 'fpn' needs backbone maps of strides 4, 8, 16, ...; the "
                         f"backbone gives {[(m.name, m.stride) for m in inputs]}")
    return FPN(spec.channels, spec.norm, in_features=tuple(m.name for m in inputs), dtype=dtype)


registry.register_neck('fpn', FPNSpec, build)
