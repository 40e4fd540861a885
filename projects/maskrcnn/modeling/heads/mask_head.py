"""Mask R-CNN mask head (He et al. 2017): 14x14 RoI features -> 28x28 per-class logits."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from projects.maskrcnn.modeling.layers import Upsample2xConv, conv, make_norm


class MaskHead(nn.Module):
    """`num_convs` 3x3 convs, 2x upsampling, a 1x1 conv per class.

    Attributes:
      num_classes: K.
      upsample: 'deconv' (2x2 stride-2 transposed conv, as the reference
        weights) or 'bilinear' (the design document's option).
      class_agnostic: predict one mask for all classes.
    """
    num_classes: int
    conv_dim: int = 256
    num_convs: int = 4
    upsample: str = 'deconv'
    norm: str = 'none'
    class_agnostic: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Args: [R, S, S, C]. Returns: [R, 2S, 2S, K or 1] float32 logits."""
        x = roi_features
        for i in range(self.num_convs):
            x = conv(self.conv_dim, 3, use_bias=self.norm == 'none', dtype=self.dtype,
                     name=f'conv{i + 1}')(x)
            x = nn.relu(make_norm(self.norm, train, self.dtype, f'norm{i + 1}')(x))
        if self.upsample == 'deconv':
            x = Upsample2xConv(self.conv_dim, dtype=self.dtype, name='deconv')(x)
        elif self.upsample == 'bilinear':
            r, s, _, c = x.shape
            x = jax.image.resize(x, (r, 2 * s, 2 * s, c), 'bilinear')
        else:
            raise ValueError(f"unknown mask-head upsample {self.upsample!r}; "
                             "expected 'deconv' or 'bilinear'")
        x = nn.relu(x)
        out = 1 if self.class_agnostic else self.num_classes
        logits = conv(out, 1, use_bias=True, dtype=self.dtype,
                      kernel_init=nn.initializers.normal(0.001), name='predictor')(x)
        return logits.astype(jnp.float32)
