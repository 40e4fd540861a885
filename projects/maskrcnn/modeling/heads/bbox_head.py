"""Fast R-CNN box head: pooled RoI features -> class scores and per-class deltas."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from projects.maskrcnn.modeling.layers import dense


class BoxHead(nn.Module):
    """`num_fc` fully connected layers (2 x 1024), then the two predictors.

    Attributes:
      num_classes: K foreground classes; the classifier has K + 1 outputs,
        background at index 0.
      class_agnostic: one box regression for all classes instead of K.
    """
    num_classes: int
    fc_dim: int = 1024
    num_fc: int = 2
    class_agnostic: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Args: [..., 7, 7, C] pooled features.

        Returns:
          class_logits [..., K + 1] and box deltas [..., K or 1, 4] (float32).
        """
        x = roi_features.reshape(roi_features.shape[:-3] + (-1,))
        for i in range(self.num_fc):
            x = nn.relu(dense(self.fc_dim, dtype=self.dtype, name=f'fc{i + 1}')(x))
        logits = dense(self.num_classes + 1, dtype=self.dtype,
                       kernel_init=nn.initializers.normal(0.01), name='cls_score')(x)
        num_reg = 1 if self.class_agnostic else self.num_classes
        deltas = dense(4 * num_reg, dtype=self.dtype,
                       kernel_init=nn.initializers.normal(0.001), name='bbox_pred')(x)
        return (logits.astype(jnp.float32),
                deltas.reshape(deltas.shape[:-1] + (num_reg, 4)).astype(jnp.float32))
