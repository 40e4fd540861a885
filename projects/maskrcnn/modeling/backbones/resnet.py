"""ResNet backbones (He et al. 2016) returning the C2..C5 feature maps.

Depth and width are configurable; norm is trainable BN, frozen BN (pretrained
weights) or GroupNorm (from-scratch runs). `stride_in_1x1` selects where a
bottleneck block downsamples: in the 1x1 conv as the MSRA/Detectron2 weights,
or in the 3x3 conv as torchvision.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from projects.maskrcnn.modeling import registry
from projects.maskrcnn.modeling.layers import conv, make_norm, max_pool

# Blocks per stage (res2..res5) and whether the block is a bottleneck.
RESNET_SPECS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}




@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """`config.model.backbone` with name 'resnet' (see `ResNet`); Detectron2's R50 defaults."""
    depth: int = 50
    width: int = 64
    norm: str = 'frozen_bn'      # 'bn' (SyncBN under jit), 'frozen_bn', 'gn', 'ln', 'none'
    freeze_at: int = 2
    stride_in_1x1: bool = False  # True for MSRA/Detectron2 weights
    norm_eps: float = 1e-5       # of 'bn' and 'frozen_bn'; torchvision and Detectron2 use 1e-5


class BasicBlock(nn.Module):
    channels: int
    stride: int
    norm: str
    train: bool
    dtype: Any = jnp.float32
    norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        out_channels = self.channels
        norm = lambda name: make_norm(self.norm, self.train, self.dtype, name, eps=self.norm_eps)
        y = conv(out_channels, 3, self.stride, dtype=self.dtype, name='conv1')(x)
        y = nn.relu(norm('norm1')(y))
        y = conv(out_channels, 3, dtype=self.dtype, name='conv2')(y)
        y = norm('norm2')(y)
        if x.shape[-1] != out_channels or self.stride != 1:
            x = conv(out_channels, 1, self.stride, dtype=self.dtype, name='shortcut')(x)
            x = norm('shortcut_norm')(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    channels: int  # bottleneck width; the block outputs 4x this.
    stride: int
    norm: str
    train: bool
    stride_in_1x1: bool = False
    dtype: Any = jnp.float32
    norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        out_channels = 4 * self.channels
        norm = lambda name: make_norm(self.norm, self.train, self.dtype, name, eps=self.norm_eps)
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        y = conv(self.channels, 1, s1, dtype=self.dtype, name='conv1')(x)
        y = nn.relu(norm('norm1')(y))
        y = conv(self.channels, 3, s3, dtype=self.dtype, name='conv2')(y)
        y = nn.relu(norm('norm2')(y))
        y = conv(out_channels, 1, dtype=self.dtype, name='conv3')(y)
        y = norm('norm3')(y)
        if x.shape[-1] != out_channels or self.stride != 1:
            x = conv(out_channels, 1, self.stride, dtype=self.dtype, name='shortcut')(x)
            x = norm('shortcut_norm')(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet trunk.

    Attributes:
      depth: 18, 34, 50, 101 or 152.
      width: channels of the stem and of res2's bottleneck (64 in the paper).
      norm: 'bn', 'frozen_bn', 'gn' or 'none'.
      freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 also freezes
        res2..res{k} (Detectron2's FREEZE_AT). Frozen stages get no gradient.
      stride_in_1x1: downsample in the bottleneck's 1x1 conv (MSRA weights).
      norm_eps: epsilon of the batch norms ('bn' and 'frozen_bn').
    """
    depth: int = 50
    width: int = 64
    norm: str = 'frozen_bn'
    freeze_at: int = 2
    stride_in_1x1: bool = False
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        """Maps [B, H, W, 3] images to {'c2': stride 4, ..., 'c5': stride 32}."""
        if self.depth not in RESNET_SPECS:
            raise ValueError(f'unsupported ResNet depth {self.depth}; '
                             f'choose one of {sorted(RESNET_SPECS)}')
        blocks, bottleneck = RESNET_SPECS[self.depth]
        x = conv(self.width, 7, 2, dtype=self.dtype, name='stem_conv')(x.astype(self.dtype))
        x = nn.relu(make_norm(self.norm, train, self.dtype, 'stem_norm', eps=self.norm_eps)(x))
        x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        outputs = {}
        for stage, num_blocks in enumerate(blocks):
            channels = self.width * 2 ** stage
            for i in range(num_blocks):
                stride = 2 if (i == 0 and stage > 0) else 1
                if bottleneck:
                    block = Bottleneck(channels, stride, self.norm, train,
                                       self.stride_in_1x1, self.dtype, self.norm_eps,
                                       name=f'res{stage + 2}_block{i}')
                else:
                    block = BasicBlock(channels, stride, self.norm, train, self.dtype,
                                       self.norm_eps, name=f'res{stage + 2}_block{i}')
                x = block(x)
            if self.freeze_at >= stage + 2:
                x = jax.lax.stop_gradient(x)
            outputs[f'c{stage + 2}'] = x
        return outputs


def frozen_prefixes(freeze_at: int) -> tuple[str, ...]:
    """Parameter-name prefixes of the stages that `freeze_at` freezes."""
    prefixes = ('stem_',) if freeze_at >= 1 else ()
    return prefixes + tuple(f'res{s}_' for s in range(2, freeze_at + 1))


def feature_maps(spec: ResNetSpec) -> tuple[registry.FeatureMap, ...]:
    """c2..c5: strides 4..32; a bottleneck stage gives 4x its width."""
    if spec.depth not in RESNET_SPECS:
        raise ValueError(f'unsupported ResNet depth model.backbone.depth={spec.depth}; '
                         f'choose one of {sorted(RESNET_SPECS)}')
    expansion = 4 if RESNET_SPECS[spec.depth][1] else 1
    return tuple(registry.FeatureMap(f'c{s + 2}', 2 ** (s + 2), expansion * spec.width * 2 ** s)
                 for s in range(4))


def build(spec: ResNetSpec, dtype: Any) -> ResNet:
    return ResNet(**dataclasses.asdict(spec), dtype=dtype)


registry.register_backbone('resnet', ResNetSpec, build, feature_maps,
                           frozen_prefixes=lambda spec: frozen_prefixes(spec.freeze_at))
