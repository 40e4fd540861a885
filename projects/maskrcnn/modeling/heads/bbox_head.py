"""Fast R-CNN box head: pooled RoI features -> class scores and per-class deltas."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from projects.maskrcnn.modeling.layers import conv, dense, make_norm


class BoxHead(nn.Module):
    """`num_convs` 3x3 convs, `num_fc` fully connected layers, then the two predictors.

    Follows Detectron2's FastRCNNConvFCHead: the default (no convs, 2 x 1024 fc) is
    its "2fc" head, num_convs=4 with num_fc=1 its "4conv1fc" head. Parameter names
    mirror its keys: `conv1`..`conv{num_convs}` (no bias when normed; MSRA init) each
    followed by its norm `norm1`.. (Detectron2's `convI.norm`), `fc1`.. (Xavier init),
    then `cls_score` and `bbox_pred`.

    Attributes:
      num_classes: K foreground classes; the classifier has K + 1 outputs,
        background at index 0.
      num_convs: 3x3 convs (ReLU after each) before the fc layers.
      conv_dim: their output channels.
      norm: their norm: 'none', 'bn' (batch statistics of all RoIs of the global
        batch under jit, SyncBN), 'gn' or 'ln' (LayerNorm over channels per position).
      class_agnostic: one box regression for all classes instead of K.
    """
    num_classes: int
    fc_dim: int = 1024
    num_fc: int = 2
    class_agnostic: bool = False
    num_convs: int = 0
    conv_dim: int = 256
    norm: str = 'none'
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features: jnp.ndarray, train: bool = False
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Args: [..., 7, 7, C] pooled features; `train` updates batch-norm statistics.

        Returns:
          class_logits [..., K + 1] and box deltas [..., K or 1, 4] (float32).
        """
        lead = roi_features.shape[:-3]
        # One batch of RoIs, so that GroupNorm and BatchNorm see [N, 7, 7, C] maps.
        x = roi_features.reshape((-1,) + roi_features.shape[-3:])
        for i in range(self.num_convs):
            # `conv` starts from MSRA init and `dense` from Xavier, as Detectron2's head.
            x = conv(self.conv_dim, 3, use_bias=self.norm == 'none', dtype=self.dtype,
                     name=f'conv{i + 1}')(x)
            x = nn.relu(make_norm(self.norm, train, self.dtype, f'norm{i + 1}')(x))
        x = x.reshape(lead + (-1,))
        for i in range(self.num_fc):
            x = nn.relu(dense(self.fc_dim, dtype=self.dtype, name=f'fc{i + 1}')(x))
        logits = dense(self.num_classes + 1, dtype=self.dtype,
                       kernel_init=nn.initializers.normal(0.01), name='cls_score')(x)
        num_reg = 1 if self.class_agnostic else self.num_classes
        deltas = dense(4 * num_reg, dtype=self.dtype,
                       kernel_init=nn.initializers.normal(0.001), name='bbox_pred')(x)
        return (logits.astype(jnp.float32),
                deltas.reshape(deltas.shape[:-1] + (num_reg, 4)).astype(jnp.float32))
