"""Where each tensor of a MAE or Detectron2 ViTDet checkpoint goes in Detectax.

MAE pretraining checkpoints (`mae_pretrain_vit_{base,large,huge_p14to16}.pth`,
`{'model': state_dict}`) hold the bare ViT; Detectron2's ViTDet model-zoo
`.pkl` files hold the whole detector, the ViT under `backbone.net.`:

  MAE / Detectron2 (`backbone.net.` + ...)   Detectax
  patch_embed.proj.{weight,bias}             body/patch_embed/proj/{kernel,bias}
  pos_embed (1, 1 + 14*14, C)                body/pos_embed (kept in that layout)
  blocks.i.norm1 / norm2                     body/blocks_i/norm1 / norm2 (scale, bias)
  blocks.i.attn.qkv / attn.proj              body/blocks_i/attn/qkv / proj
  blocks.i.attn.rel_pos_h / rel_pos_w        body/blocks_i/attn/rel_pos_h / rel_pos_w
  blocks.i.mlp.fc1 / mlp.fc2                 body/blocks_i/mlp/fc1 / fc2
  backbone.simfp_L.k(.norm)                  neck/simfp_L_k(_norm)
  roi_heads.box_head.conv{k} / conv{k}.norm  box_predictor/conv{k} / norm{k}
  roi_heads.box_head.fc1 (after convs)       box_predictor/fc1 (rows reordered)
  roi_heads.mask_head.mask_fcn{k}.norm       mask_predictor/norm{k}

MAE's `cls_token` and final `norm.*` have no place in ViTDet (no class token,
no final norm): they are dropped, and the conversion notes say so. MAE has no
rel-pos tables; they keep their zero init. The RPN's `conv.conv0/conv1`, the
predictors and the mask head convs match the ResNet detector's rules in
name_maps.py, which are consulted after these.
"""

import re
from collections.abc import Iterable

from projects.maskrcnn.tools.name_maps import Target, _layer

BACKBONE = 'body'
NECK = 'neck'
# The detector's module names of the box head (BoxHead: conv{k}, norm{k}, fc1,
# cls_score, bbox_pred) and the mask head (MaskHead: conv{k}, norm{k}, deconv, predictor).
BOX_HEAD = 'box_predictor'
MASK_HEAD = 'mask_predictor'
# LayerNorm leaves: trainable parameters, not frozen statistics.
_LN_LEAVES = {'weight': 'scale', 'bias': 'bias'}
_W = r'(weight|bias)'


def _ln(module: tuple[str, ...], leaf_name: str) -> Target:
    return Target(module, _LN_LEAVES[leaf_name], 'vector')


def _trunk_rules(prefix: str) -> list:
    """Rules of the bare ViT trunk under a key prefix ('' for MAE)."""
    b = (BACKBONE,)
    return [
        (rf'{prefix}patch_embed\.proj\.{_W}',
         lambda m: _layer(b + ('patch_embed', 'proj'), m[1], 'conv')),
        (rf'{prefix}pos_embed', lambda m: Target(b, 'pos_embed', 'vector')),
        (rf'{prefix}blocks\.(\d+)\.(norm1|norm2)\.{_W}',
         lambda m: _ln(b + (f'blocks_{m[1]}', m[2]), m[3])),
        (rf'{prefix}blocks\.(\d+)\.(attn|mlp)\.(qkv|proj|fc1|fc2)\.{_W}',
         lambda m: _layer(b + (f'blocks_{m[1]}', m[2], m[3]), m[4], 'linear')),
        (rf'{prefix}blocks\.(\d+)\.attn\.(rel_pos_h|rel_pos_w)',
         lambda m: Target(b + (f'blocks_{m[1]}', 'attn'), m[2], 'vector')),
    ]


MAE_RULES = _trunk_rules('')
# MAE tensors ViTDet has no use for.
MAE_DROPPED = re.compile(r'cls_token|norm\.(weight|bias)')


def _simfp(m: re.Match) -> Target:
    level, index, norm, leaf = m[1], int(m[2]), m[3], m[4]
    module = (NECK, f'simfp_{level}_{index}' + ('_norm' if norm else ''))
    if norm or (level == '2' and index == 1):  # simfp_2.1 is the LayerNorm between the deconvs
        return _ln(module, leaf)
    deconv = (level == '2' and index in (0, 3)) or (level == '3' and index == 0)
    return _layer(module, leaf, 'deconv' if deconv else 'conv')


VITDET_RULES = _trunk_rules(r'backbone\.net\.') + [
    (rf'backbone\.simfp_([2-5])\.(\d)(\.norm)?\.{_W}', _simfp),
    (rf'roi_heads\.box_head\.conv(\d+)\.{_W}',
     lambda m: _layer((BOX_HEAD, f'conv{m[1]}'), m[2], 'conv')),
    (rf'roi_heads\.box_head\.conv(\d+)\.norm\.{_W}',
     lambda m: _ln((BOX_HEAD, f'norm{m[1]}'), m[2])),
    (rf'roi_heads\.mask_head\.mask_fcn(\d)\.norm\.{_W}',
     lambda m: _ln((MASK_HEAD, f'norm{m[1]}'), m[2])),
]

_CONV_HEAD = re.compile(r'roi_heads\.box_head\.conv(\d+)\.weight')
_FC1 = re.compile(rf'roi_heads\.box_head\.fc1\.{_W}')


def _box_head_convs(names: Iterable[str]) -> list[str]:
    return sorted((n for n in names if _CONV_HEAD.fullmatch(n)),
                  key=lambda n: int(_CONV_HEAD.fullmatch(n)[1]))


def target_of(source: str, name: str, names: Iterable[str] = ()) -> Target | None:
    """The Detectax variable of one MAE or Detectron2 ViTDet tensor, else None.

    `names`: every name of the checkpoint; behind convolutions ("4conv1fc") the
    box head's `fc1` flattens the last conv's map, not the pooled features.
    """
    if source == 'mae':
        rules = MAE_RULES
    elif source == 'detectron2':
        rules = VITDET_RULES
        m = _FC1.fullmatch(name)
        if m and _box_head_convs(names):
            return _layer((BOX_HEAD, 'fc1'), m[1], 'fc_first')
    else:
        return None
    for pattern, make in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return make(m)
    return None


def dropped(source: str, names: Iterable[str]) -> list[str]:
    """The names of a checkpoint that are deliberately left out (MAE's class
    token and final norm)."""
    return sorted(n for n in names if source == 'mae' and MAE_DROPPED.fullmatch(n))


def pooled_channels(state) -> int | None:
    """Channels of the RoI features that a 4conv1fc box head's fc1 flattens:
    the last box-head conv's outputs (None without conv heads)."""
    convs = _box_head_convs(state)
    return int(state[convs[-1]].shape[0]) if convs else None
