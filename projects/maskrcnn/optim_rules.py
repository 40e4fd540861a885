"""Rules on parameter paths for the optimizer: weight-decay exemptions and
layer-wise learning-rate decay. Any config can use them:

  config.optimizer_configs.no_weight_decay = VITDET_NO_WEIGHT_DECAY  # regexes
  config.optimizer_configs.layerwise_decay = 0.7                     # ViT-B

A parameter's path is its Flax path joined by '/', e.g.
'body/blocks_3/norm1/scale' or 'neck/simfp_2_4_norm/bias'.

Weight decay (`no_weight_decay`): a parameter is exempt when a pattern matches
its whole path (`re.fullmatch`). Detectron2's ViTDet exempts only the ViT
blocks' LayerNorms (norm1, norm2) and `pos_embed`: the pyramid's and heads'
channel LayerNorms, every bias and the rel-pos tables are decayed; its ViT-H
recipe decays everything (an empty tuple). Without the key the project's
ResNet rule holds: every parameter under a module whose name contains 'norm'.

Layer-wise lr decay (follows Detectron2's `get_vit_lr_decay_rate`): layer id 0
for `pos_embed` and `patch_embed`, i + 1 for `blocks_i`, depth + 1 for all else;
the update (learning rate and decoupled weight decay alike) is multiplied by
decay ** (depth + 1 - layer_id). ViT-B (depth 12, decay 0.7): stem 0.7^13 =
0.0097, block 11 0.7, pyramid and heads 1.
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

VITDET_NO_WEIGHT_DECAY = (r'(.+/)?blocks_\d+/norm[12]/(scale|bias)', r'(.+/)?pos_embed')
_BLOCK = re.compile(r'blocks_(\d+)')
_STEM = ('pos_embed', 'patch_embed')


def path_name(path: Sequence[str]) -> str:
    return '/'.join(str(p) for p in path)


def _is_norm(path: Sequence[str]) -> bool:
    return any('norm' in p for p in path[:-1])


def no_decay_rule(patterns: Sequence[str] | None) -> Callable[[Sequence[str]], bool]:
    """path -> True when weight decay is skipped; None: the norm-module rule."""
    if patterns is None:
        return _is_norm
    if isinstance(patterns, str):
        raise TypeError(f'config.optimizer_configs.no_weight_decay={patterns!r} must be a '
                         'sequence of regular expressions, not one string')
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f'config.optimizer_configs.no_weight_decay: bad pattern {e.pattern!r}: '
                         f'{e}') from e
    return lambda path: any(c.fullmatch(path_name(path)) for c in compiled)


def layer_id(path: Sequence[str], num_layers: int) -> int:
    """0 for the patch and position embeddings, i + 1 inside `blocks_i`,
    num_layers + 1 elsewhere."""
    for part in path:
        if part in _STEM:
            return 0
        m = _BLOCK.fullmatch(str(part))
        if m:
            return int(m[1]) + 1
    return num_layers + 1


def count_blocks(params: Any) -> int:
    """Number of `blocks_i` modules (1 + the largest i), 0 without any."""
    ids = [int(m[1]) for path in flax.traverse_util.flatten_dict(params)
           for m in map(_BLOCK.fullmatch, map(str, path)) if m]
    return max(ids) + 1 if ids else 0


def layerwise_lr_scales(params: Any, decay: float, num_layers: int | None = None) -> Any:
    """The tree of lr multipliers decay ** (num_layers + 1 - layer_id) for `params`.

    num_layers: the ViT's depth; by default counted from the `blocks_i` modules.
    """
    if not 0 < decay <= 1:
        raise ValueError(f'config.optimizer_configs.layerwise_decay={decay} must be in (0, 1]')
    if num_layers is None:
        num_layers = count_blocks(params)
    if not num_layers:
        raise ValueError('config.optimizer_configs.layerwise_decay is set but the model has no '
                         'blocks_i modules (a ViT backbone) to decay over')
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {path: float(decay ** (num_layers + 1 - layer_id(path, num_layers))) for path in flat})


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by its leaf of `scales` (a tree of floats)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype),
                                      updates, scales), state

    return optax.GradientTransformation(init, update)
