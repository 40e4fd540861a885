"""Region Proposal Network head, shared across pyramid levels (Ren et al. 2015)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from projects.maskrcnn.modeling.layers import conv

_normal_001 = nn.initializers.normal(0.01)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then per-anchor objectness logits and box deltas.

    Attributes:
      num_anchors: A, anchors per feature position.
      num_convs: shared 3x3 convs before the predictors (1 in the paper).
    """
    num_anchors: int = 3
    num_convs: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: list[jnp.ndarray]
                 ) -> tuple[list[jnp.ndarray], list[jnp.ndarray]]:
        """Args: L maps [B, H_l, W_l, C].

        Returns:
          objectness: L arrays [B, H_l * W_l * A] (logits).
          deltas: L arrays [B, H_l * W_l * A, 4].
        """
        channels = features[0].shape[-1]
        convs = [conv(channels, 3, use_bias=True, dtype=self.dtype,
                      kernel_init=_normal_001, name=f'conv{i}')
                 for i in range(self.num_convs)]
        objectness_conv = conv(self.num_anchors, 1, use_bias=True, dtype=self.dtype,
                               kernel_init=_normal_001, name='objectness')
        delta_conv = conv(4 * self.num_anchors, 1, use_bias=True, dtype=self.dtype,
                          kernel_init=_normal_001, name='deltas')
        logits, deltas = [], []
        for x in features:
            for c in convs:
                x = nn.relu(c(x))
            b = x.shape[0]
            logits.append(objectness_conv(x).reshape(b, -1).astype(jnp.float32))
            deltas.append(delta_conv(x).reshape(b, -1, 4).astype(jnp.float32))
        return logits, deltas
