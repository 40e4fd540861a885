"""Plain Vision Transformer trunk of ViTDet (Li et al. 2022), one stride-16 map out.

Follows Detectron2's `modeling/backbone/vit.py` (read, not copied):
- patch embedding: a 16x16 stride-16 convolution, NHWC tokens [B, h, w, C];
- absolute position embedding stored as MAE pretrains it, (1, 1 + 14*14, C)
  with a class slot, the slot dropped and the 14x14 grid resized to (h, w) on
  every call with PyTorch's bicubic rule (ops/interpolation.py);
- blocks `x + drop_path(attn(norm1(x)))`, `x + drop_path(mlp(norm2(x)))`, most
  attending inside 14x14 windows (the map zero-padded bottom/right after norm1,
  padded tokens not masked, as Detectron2), a few attending globally;
- decomposed relative position (MViTv2) in every block;
- LayerNorm eps 1e-6 with two-pass variance, exact erf GELU, no final norm.

Parameter names mirror the PyTorch module's, so converting MAE or Detectron2
weights is renaming plus transposing: `patch_embed/proj`, `pos_embed`,
`blocks_{i}/norm1`, `blocks_{i}/attn/qkv`, `blocks_{i}/attn/proj`,
`blocks_{i}/attn/rel_pos_h`, `blocks_{i}/attn/rel_pos_w`, `blocks_{i}/norm2`,
`blocks_{i}/mlp/fc1`, `blocks_{i}/mlp/fc2`.

Shapes: B images, h x w tokens (image side / 16), C width, n heads, d = C / n.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from projects.maskrcnn.modeling import layers, registry
from projects.maskrcnn.ops import interpolation


@dataclasses.dataclass(frozen=True)
class ViTSize:
    """One row of ViTDet's size table (Detectron2's ViTDet COCO configs)."""
    width: int
    depth: int
    num_heads: int
    global_blocks: tuple[int, ...]
    drop_path_rate: float
    layerwise_decay: float


VIT_SIZES = {
    'B': ViTSize(768, 12, 12, (2, 5, 8, 11), 0.1, 0.7),
    'L': ViTSize(1024, 24, 16, (5, 11, 17, 23), 0.4, 0.8),
    'H': ViTSize(1280, 32, 16, (7, 15, 23, 31), 0.5, 0.9),
}

# Detectron2 initialises Linear weights with trunc_normal_(std=0.02), whose
# cut-off is +-2 in absolute units, i.e. at 100 sigma: a plain normal.
_linear_init = nn.initializers.normal(0.02)
# PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def layer_norm(name: str) -> nn.LayerNorm:
    """Detectron2's LayerNorm: eps 1e-6, variance as E[(x - mean)^2], in float32."""
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32, name=name)


def resize_abs_pos(pos_embed: jnp.ndarray, grid_hw: tuple[int, int]) -> jnp.ndarray:
    """(1, 1 + S*S, C) MAE position table -> [h, w, C] for a token grid (h, w)."""
    table = pos_embed[0, 1:]
    side = round(float(np.sqrt(table.shape[0])))
    if side * side != table.shape[0]:
        raise ValueError(f'pos_embed holds {table.shape[0]} positions after the class slot, '
                         'not a square grid')
    table = table.reshape(side, side, -1)
    h, w = grid_hw
    if (h, w) == (side, side):
        return table
    mh = jnp.asarray(interpolation.bicubic_matrix(side, h), jnp.float32)
    mw = jnp.asarray(interpolation.bicubic_matrix(side, w), jnp.float32)
    return jnp.einsum('ip,jq,pqc->ijc', mh, mw, table, precision=jax.lax.Precision.HIGHEST)


def rel_pos_table(q_size: int, k_size: int, rel_pos: jnp.ndarray) -> jnp.ndarray:
    """[q_size, k_size, d] relative embeddings R[q - k] for one axis.

    The (L, d) table is first resized linearly to 2 * max(q, k) - 1 rows when its
    length differs; unequal q and k sizes scale the shorter one's coordinates (MViTv2).
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        matrix = jnp.asarray(interpolation.linear_matrix(rel_pos.shape[0], length), rel_pos.dtype)
        rel_pos = jnp.matmul(matrix, rel_pos, precision=jax.lax.Precision.HIGHEST)
    q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    index = (q_coords - k_coords + (k_size - 1) * max(q_size / k_size, 1.0)).astype(np.int64)
    return rel_pos[index]


def attend_rows(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, rel_h: jnp.ndarray | None,
                rel_w: jnp.ndarray | None, dtype: Any) -> jnp.ndarray:
    """Softmax attention of r query rows of the grid over all h x w keys.

    Args:
      q: [B, n, r, w, d] queries (unscaled).
      k, v: [B, n, h * w, d].
      rel_h: [r, h, d] rel-pos embeddings of the rows' (query, key) row pairs, or None.
      rel_w: [w, w, d] of the (query, key) column pairs, or None.
      dtype: of the probabilities and the value matmul.
    Returns:
      [B, n, r * w, d].
    """
    b, n, r, w, d = q.shape
    logits = jnp.einsum('bnqd,bnkd->bnqk', (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, n, r * w, d),
                        k, preferred_element_type=jnp.float32)
    if rel_h is not None:
        # The rel-pos terms use the unscaled queries, as Detectron2 does.
        rq = q.astype(jnp.float32)
        bias_h = jnp.einsum('bnrwd,rkd->bnrwk', rq, rel_h)
        bias_w = jnp.einsum('bnrwd,wkd->bnrwk', rq, rel_w)
        kh, kw = rel_h.shape[1], rel_w.shape[1]
        logits = (logits.reshape(b, n, r, w, kh, kw) + bias_h[..., :, None]
                  + bias_w[..., None, :]).reshape(b, n, r * w, kh * kw)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum('bnqk,bnkd->bnqd', probs, v.astype(dtype))


def attend_in_chunks(q, k, v, rel_h, rel_w, dtype, chunks: int) -> jnp.ndarray:
    """`attend_rows` over all h query rows, `chunks` groups of rows at a time.

    Each group's logits and probabilities ([B, n, h * w / chunks, h * w]) live
    only while it is computed and are recomputed in the backward pass (one
    `jax.checkpoint`ed loop body), so the step holds a chunk of them, not all.
    Rows are zero-padded to a multiple of `chunks` and the padded outputs dropped;
    every query row attends exactly as in one piece.
    """
    b, n, h, w, d = q.shape
    rows = -(-h // chunks)
    pad = rows * chunks - h
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
    q = q.reshape(b, n, chunks, rows, w, d).transpose(2, 0, 1, 3, 4, 5)
    if rel_h is not None:
        rel_h = jnp.pad(rel_h, ((0, pad), (0, 0), (0, 0))).reshape(chunks, rows, *rel_h.shape[1:])

    @jax.checkpoint
    def group(args):
        q_rows, rel_h_rows = args
        return attend_rows(q_rows, k, v, rel_h_rows, rel_w, dtype)

    out = jax.lax.map(group, (q, rel_h))                       # [chunks, B, n, rows * w, d]
    out = out.reshape(chunks, b, n, rows, w, d).transpose(1, 2, 0, 3, 4, 5)
    return out.reshape(b, n, chunks * rows, w, d)[:, :, :h].reshape(b, n, h * w, d)


class Attention(nn.Module):
    """Multi-head self-attention over a [B', h, w, C] map with decomposed rel-pos.

    Attributes:
      num_heads: heads n.
      rel_pos_size: S, the (h, w) the rel-pos tables are sized for (2S - 1 rows).
      query_chunks: > 1 computes the attention in that many groups of query rows,
        each recomputed in the backward pass (`attend_in_chunks`): the same values,
        less memory for the global blocks' (h w) x (h w) logits.
      dtype: of the matmuls; logits, rel-pos terms and the softmax stay float32.
    """
    num_heads: int
    rel_pos_size: tuple[int, int]
    use_rel_pos: bool = True
    query_chunks: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, c = x.shape
        n, d = self.num_heads, c // self.num_heads
        dense = functools.partial(layers.dense, dtype=self.dtype, kernel_init=_linear_init)
        qkv = dense(3 * c, name='qkv')(x).reshape(b, h * w, 3, n, d)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B', n, hw, d]
        q = q.reshape(b, n, h, w, d)
        rel_h = rel_w = None
        if self.use_rel_pos:
            rel_h = self.param('rel_pos_h', nn.initializers.zeros, (2 * self.rel_pos_size[0] - 1, d))
            rel_w = self.param('rel_pos_w', nn.initializers.zeros, (2 * self.rel_pos_size[1] - 1, d))
            rel_h, rel_w = rel_pos_table(h, h, rel_h), rel_pos_table(w, w, rel_w)
        if self.query_chunks > 1:
            out = attend_in_chunks(q, k, v, rel_h, rel_w, self.dtype, self.query_chunks)
        else:
            out = attend_rows(q, k, v, rel_h, rel_w, self.dtype)
        out = out.transpose(0, 2, 1, 3).reshape(b, h, w, c)
        return dense(c, name='proj')(out)


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dense = functools.partial(layers.dense, dtype=self.dtype, kernel_init=_linear_init)
        y = nn.gelu(dense(self.hidden, name='fc1')(x), approximate=False)
        return dense(x.shape[-1], name='fc2')(y)


def window_partition(x: jnp.ndarray, window: int) -> jnp.ndarray:
    """[B, h, w, C] -> [B * nh * nw, window, window, C], zero-padded bottom/right."""
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    nh, nw = (h + ph) // window, (w + pw) // window
    x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, window, window, c)


def window_unpartition(windows: jnp.ndarray, window: int, hw: tuple[int, int]) -> jnp.ndarray:
    """Inverse of `window_partition`, cropped back to hw: -> [B, h, w, C]."""
    h, w = hw
    nh, nw = -(-h // window), -(-w // window)
    c = windows.shape[-1]
    x = windows.reshape(-1, nh, nw, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, nh * window, nw * window, c)[:, :h, :w]


def drop_path(x: jnp.ndarray, rate: float, rng: jax.Array) -> jnp.ndarray:
    """Stochastic depth: zero a sample's residual branch with probability `rate`."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nn.Module):
    """One transformer block; window > 0 attends inside windows, 0 globally
    (in `query_chunks` groups of query rows where > 1, `attend_in_chunks`).

    The residual stream stays float32 (Detectron2 under AMP adds float16
    branches to a float32 stream); LayerNorms run in float32.
    """
    num_heads: int
    mlp_ratio: float
    window: int
    rel_pos_size: tuple[int, int]
    drop_path_rate: float = 0.0
    use_rel_pos: bool = True
    rng_collection: str = 'sampling'
    dtype: Any = jnp.float32
    query_chunks: int = 1

    def _residual(self, x, branch, train):
        if train and self.drop_path_rate > 0:
            branch = drop_path(branch, self.drop_path_rate, self.make_rng(self.rng_collection))
        return x + branch.astype(x.dtype)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        h, w = x.shape[1:3]
        y = layer_norm('norm1')(x).astype(self.dtype)
        if self.window:
            y = window_partition(y, self.window)
        y = Attention(self.num_heads, self.rel_pos_size, self.use_rel_pos,
                      query_chunks=self.query_chunks, dtype=self.dtype, name='attn')(y)
        if self.window:
            y = window_unpartition(y, self.window, (h, w))
        x = self._residual(x, y, train)
        y = layer_norm('norm2')(x).astype(self.dtype)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name='mlp')(y)
        return self._residual(x, y, train)


class ViT(nn.Module):
    """ViTDet's plain ViT: [B, H, W, 3] images -> [B, H/16, W/16, C] (stride 16).

    Attributes:
      width, depth, num_heads: C, number of blocks, heads.
      global_blocks: indices of the blocks that attend globally.
      patch_size: 16.
      window_size: side of the attention windows of the other blocks (14).
      image_size: the input side the global blocks' rel-pos tables are sized
        for (1024: 2 * 64 - 1 rows); other inputs resize them linearly.
      pretrain_grid: side of the stored position grid (224 / 16 = 14 for MAE).
      drop_path_rate: stochastic depth of the last block, linear from 0.
      remat: rematerialise each block in the backward pass (nn.remat).
      global_attention_chunks: the global blocks attend in this many groups of
        query rows, each recomputed in the backward pass (`attend_in_chunks`);
        1 computes the (h w) x (h w) logits in one piece.
      rng_collection: the RNG stream drop path draws from.
      dtype: of the convolution and matmuls (float32 or bfloat16).
    """
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    image_size: int = 1024
    pretrain_grid: int = 14
    drop_path_rate: float = 0.1
    use_rel_pos: bool = True
    remat: bool = False
    global_attention_chunks: int = 1
    rng_collection: str = 'sampling'
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f'ViT expects [B, H, W, 3] images, got {images.shape}')
        bad = [i for i in self.global_blocks if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f'global_blocks {bad} out of range for depth {self.depth}')
        p = self.patch_size
        x = _PatchEmbed(self.width, p, self.dtype, name='patch_embed')(images)
        pos_embed = self.param('pos_embed', _linear_init,
                               (1, 1 + self.pretrain_grid ** 2, self.width))
        x = x.astype(jnp.float32) + resize_abs_pos(pos_embed, x.shape[1:3])[None]
        grid = self.image_size // p
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        for i in range(self.depth):
            is_global = i in self.global_blocks
            rate = self.drop_path_rate * i / (self.depth - 1) if self.depth > 1 else 0.0
            x = block_cls(self.num_heads, self.mlp_ratio, 0 if is_global else self.window_size,
                          (grid, grid) if is_global else (self.window_size,) * 2, rate,
                          self.use_rel_pos, self.rng_collection, self.dtype,
                          query_chunks=self.global_attention_chunks if is_global else 1,
                          name=f'blocks_{i}')(x, train)
        return x.astype(self.dtype)


def _uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class _PatchEmbed(nn.Module):
    """`proj`: the 16x16 stride-16 convolution, PyTorch's default init."""
    width: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        p = self.patch_size
        return layers.Conv(self.width, (p, p), strides=(p, p), use_bias=True, dtype=self.dtype,
                           kernel_init=torch_conv_init,
                           bias_init=_uniform_init((p * p * images.shape[-1]) ** -0.5),
                           name='proj')(images)


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """Typed settings of the ViT backbone; None takes the value of `size`'s row.

    `size` picks a row of VIT_SIZES ('B', 'L', 'H'); width, depth, num_heads,
    global_blocks and drop_path_rate override it (tiny test models).
    """
    size: str = 'B'
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    global_blocks: tuple[int, ...] | None = None
    drop_path_rate: float | None = None
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    image_size: int = 1024
    pretrain_grid: int = 14
    use_rel_pos: bool = True
    remat: bool = False
    global_attention_chunks: int = 1

    def resolved(self) -> dict[str, Any]:
        """The ViT module's fields, the size table filled in."""
        if self.size not in VIT_SIZES:
            raise ValueError(f'backbone.size={self.size!r} is not one of {sorted(VIT_SIZES)}')
        row = dataclasses.asdict(VIT_SIZES[self.size])
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != 'size'}
        for key in ('width', 'depth', 'num_heads', 'global_blocks', 'drop_path_rate'):
            if fields[key] is None:
                fields[key] = row[key]
        fields['global_blocks'] = tuple(fields['global_blocks'])
        if fields['global_attention_chunks'] < 1:
            raise ValueError('backbone.global_attention_chunks must be >= 1, got '
                             f"{fields['global_attention_chunks']}")
        if fields['width'] % fields['num_heads']:
            raise ValueError(f"ViT width {fields['width']} is not a multiple of "
                             f"num_heads {fields['num_heads']}")
        return fields

    def build(self, dtype: Any = jnp.float32, name: str | None = None) -> ViT:
        return ViT(**self.resolved(), dtype=dtype, name=name)


# ----------------------------------------------------------------------------
# As a registered backbone: `config.model.backbone.name = 'vit'`
# ----------------------------------------------------------------------------

# The key of the one map the backbone returns (Detectron2's ViT calls it so too).
OUTPUT_NAME = 'last_feat'


class ViTBackbone(ViT):
    """The ViT as the detector's backbone: {'last_feat': [B, H/16, W/16, C]}.

    Same parameters as `ViT` (no extra scope), so checkpoints of either load.
    """

    def __call__(self, images: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        return {OUTPUT_NAME: super().__call__(images, train)}


def feature_maps(spec: ViTSpec) -> tuple[registry.FeatureMap, ...]:
    """One map, stride `patch_size`, `width` channels."""
    fields = spec.resolved()
    return (registry.FeatureMap(OUTPUT_NAME, fields['patch_size'], fields['width']),)


def build(spec: ViTSpec, dtype: Any) -> ViTBackbone:
    return ViTBackbone(**spec.resolved(), dtype=dtype)


registry.register_backbone('vit', ViTSpec, build, feature_maps)
