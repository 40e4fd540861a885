"""Where each tensor of a torchvision or Detectron2 checkpoint goes in Detectax.

A rule turns a source name into a `Target`: the variable's path in the Flax
tree, and the kind of layout change it needs (see convert_checkpoint.py).
Names were read off torchvision 0.29's `maskrcnn_resnet50_fpn` / `resnet50`
state dicts and Detectron2's `c2_model_loading.py` and `modeling/`:

torchvision                              Detectron2
backbone.body.conv1 / bn1                backbone.bottom_up.stem.conv1(.norm)
backbone.body.layer1.0.conv1 / bn1       backbone.bottom_up.res2.0.conv1(.norm)
backbone.body.layer1.0.downsample.0 / 1  backbone.bottom_up.res2.0.shortcut(.norm)
backbone.fpn.inner_blocks.0(.0)          backbone.fpn_lateral2(.norm)
backbone.fpn.layer_blocks.0(.0)          backbone.fpn_output2(.norm)
rpn.head.conv(.0.0)                      proposal_generator.rpn_head.conv(.conv0, .conv1)
-                                        roi_heads.box_head.conv1(.norm)
rpn.head.cls_logits / bbox_pred          proposal_generator.rpn_head.objectness_logits / anchor_deltas
roi_heads.box_head.fc6 / fc7             roi_heads.box_head.fc1 / fc2
roi_heads.box_predictor.cls_score        roi_heads.box_predictor.cls_score
roi_heads.box_predictor.bbox_pred        roi_heads.box_predictor.bbox_pred
roi_heads.mask_head.0.0 (mask_fcn1)      roi_heads.mask_head.mask_fcn1(.norm)
roi_heads.mask_predictor.conv5_mask      roi_heads.mask_head.deconv
roi_heads.mask_predictor.mask_fcn_logits roi_heads.mask_head.predictor

The parenthesised torchvision suffixes are the current module names; the
published COCO weights predate them and use the shorter ones, so both match.
Bare ImageNet backbones drop the `backbone.body.` (torchvision `resnet50`) or
`backbone.bottom_up.` prefix; Caffe2-era Detectron2 backbones (`R-50.pkl`)
use names like `res2_0_branch2a_w`, renamed first by `c2_to_detectron2`.

The `.norm` tensors are those of Detectron2's normed models, such as the R50 LSJ
baseline (`new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ`): batch norm (SyncBN)
after the FPN convs and the box and mask head convs, which then have no bias.
They land where `norm='bn'` keeps them: the FPN's `lateral_norm_c2` and
`output_norm_c2`, the heads' `norm1`..`norm4`. Behind the box head's convs
("4conv1fc"), `fc1` flattens the last conv's (C, 7, 7) map, C its channels.
"""

import dataclasses
import re
from collections.abc import Callable

NORM_LEAVES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}


@dataclasses.dataclass(frozen=True)
class Target:
    """A Detectax variable.

    Attributes:
      module: path of the Flax module, e.g. ('body', 'res2_block0', 'conv1').
      leaf: 'kernel', 'bias' (layers) or 'scale', 'bias', 'mean', 'var' (norms).
      kind: the layout change: 'conv' (OIHW -> HWIO), 'stem_conv' (the same, for
        the first conv, whose input channels may be reordered), 'linear'
        ([out, in] -> [in, out]), 'fc_first' (linear after flattening NCHW
        RoI features, rows reordered to NHWC), 'deconv' ([in, out, kh, kw] ->
        [kh, kw, in, out]), 'vector' (biases), 'norm' (batch-norm vectors).
      head: for class-indexed outputs, 'cls_score', 'bbox_pred' or 'mask_logits'.
    """
    module: tuple[str, ...]
    leaf: str
    kind: str
    head: str | None = None


Rule = tuple[str, Callable[[re.Match], Target]]


def _layer(module: tuple[str, ...], leaf_name: str, weight_kind: str, head=None) -> Target:
    if leaf_name == 'weight':
        return Target(module, 'kernel', weight_kind, head)
    return Target(module, 'bias', 'vector', head)


def _norm(module: tuple[str, ...], leaf_name: str) -> Target:
    return Target(module, NORM_LEAVES[leaf_name], 'norm')


_W = r'(weight|bias)'
_N = r'(weight|bias|running_mean|running_var)'

TORCHVISION_RULES: list[Rule] = [
    (r'(?:backbone\.body\.)?conv1\.weight',
     lambda m: Target(('body', 'stem_conv'), 'kernel', 'stem_conv')),
    (rf'(?:backbone\.body\.)?bn1\.{_N}', lambda m: _norm(('body', 'stem_norm'), m[1])),
    (r'(?:backbone\.body\.)?layer(\d)\.(\d+)\.conv(\d)\.weight',
     lambda m: Target(('body', f'res{int(m[1]) + 1}_block{m[2]}', f'conv{m[3]}'),
                      'kernel', 'conv')),
    (rf'(?:backbone\.body\.)?layer(\d)\.(\d+)\.bn(\d)\.{_N}',
     lambda m: _norm(('body', f'res{int(m[1]) + 1}_block{m[2]}', f'norm{m[3]}'), m[4])),
    (r'(?:backbone\.body\.)?layer(\d)\.(\d+)\.downsample\.0\.weight',
     lambda m: Target(('body', f'res{int(m[1]) + 1}_block{m[2]}', 'shortcut'),
                      'kernel', 'conv')),
    (rf'(?:backbone\.body\.)?layer(\d)\.(\d+)\.downsample\.1\.{_N}',
     lambda m: _norm(('body', f'res{int(m[1]) + 1}_block{m[2]}', 'shortcut_norm'), m[3])),
    (rf'backbone\.fpn\.inner_blocks\.(\d)(?:\.0)?\.{_W}',
     lambda m: _layer(('neck', f'lateral_c{int(m[1]) + 2}'), m[2], 'conv')),
    (rf'backbone\.fpn\.layer_blocks\.(\d)(?:\.0)?\.{_W}',
     lambda m: _layer(('neck', f'output_c{int(m[1]) + 2}'), m[2], 'conv')),
    (rf'rpn\.head\.conv\.(\d+)\.0\.{_W}',
     lambda m: _layer(('rpn_head', f'conv{m[1]}'), m[2], 'conv')),
    (rf'rpn\.head\.conv\.{_W}', lambda m: _layer(('rpn_head', 'conv0'), m[1], 'conv')),
    (rf'rpn\.head\.cls_logits\.{_W}', lambda m: _layer(('rpn_head', 'objectness'), m[1], 'conv')),
    (rf'rpn\.head\.bbox_pred\.{_W}', lambda m: _layer(('rpn_head', 'deltas'), m[1], 'conv')),
    (rf'roi_heads\.box_head\.fc6\.{_W}',
     lambda m: _layer(('box_predictor', 'fc1'), m[1], 'fc_first')),
    (rf'roi_heads\.box_head\.fc7\.{_W}', lambda m: _layer(('box_predictor', 'fc2'), m[1], 'linear')),
    (rf'roi_heads\.box_predictor\.cls_score\.{_W}',
     lambda m: _layer(('box_predictor', 'cls_score'), m[1], 'linear', 'cls_score')),
    (rf'roi_heads\.box_predictor\.bbox_pred\.{_W}',
     lambda m: _layer(('box_predictor', 'bbox_pred'), m[1], 'linear', 'bbox_pred')),
    (rf'roi_heads\.mask_head\.(\d)\.0\.{_W}',
     lambda m: _layer(('mask_predictor', f'conv{int(m[1]) + 1}'), m[2], 'conv')),
    (rf'roi_heads\.mask_head\.mask_fcn(\d)\.{_W}',
     lambda m: _layer(('mask_predictor', f'conv{m[1]}'), m[2], 'conv')),
    (rf'roi_heads\.mask_predictor\.conv5_mask\.{_W}',
     lambda m: _layer(('mask_predictor', 'deconv'), m[1], 'deconv')),
    (rf'roi_heads\.mask_predictor\.mask_fcn_logits\.{_W}',
     lambda m: _layer(('mask_predictor', 'predictor'), m[1], 'conv', 'mask_logits')),
]

_BOTTOM_UP = r'(?:backbone\.bottom_up\.)?'
DETECTRON2_RULES: list[Rule] = [
    (rf'{_BOTTOM_UP}stem\.conv1\.weight',
     lambda m: Target(('body', 'stem_conv'), 'kernel', 'stem_conv')),
    (rf'{_BOTTOM_UP}stem\.conv1\.norm\.{_N}', lambda m: _norm(('body', 'stem_norm'), m[1])),
    (rf'{_BOTTOM_UP}res(\d)\.(\d+)\.conv(\d)\.weight',
     lambda m: Target(('body', f'res{m[1]}_block{m[2]}', f'conv{m[3]}'), 'kernel', 'conv')),
    (rf'{_BOTTOM_UP}res(\d)\.(\d+)\.conv(\d)\.norm\.{_N}',
     lambda m: _norm(('body', f'res{m[1]}_block{m[2]}', f'norm{m[3]}'), m[4])),
    (rf'{_BOTTOM_UP}res(\d)\.(\d+)\.shortcut\.weight',
     lambda m: Target(('body', f'res{m[1]}_block{m[2]}', 'shortcut'), 'kernel', 'conv')),
    (rf'{_BOTTOM_UP}res(\d)\.(\d+)\.shortcut\.norm\.{_N}',
     lambda m: _norm(('body', f'res{m[1]}_block{m[2]}', 'shortcut_norm'), m[3])),
    (rf'backbone\.fpn_lateral(\d)\.{_W}',
     lambda m: _layer(('neck', f'lateral_c{m[1]}'), m[2], 'conv')),
    (rf'backbone\.fpn_output(\d)\.{_W}',
     lambda m: _layer(('neck', f'output_c{m[1]}'), m[2], 'conv')),
    (rf'backbone\.fpn_lateral(\d)\.norm\.{_N}',
     lambda m: _norm(('neck', f'lateral_norm_c{m[1]}'), m[2])),
    (rf'backbone\.fpn_output(\d)\.norm\.{_N}',
     lambda m: _norm(('neck', f'output_norm_c{m[1]}'), m[2])),
    (rf'proposal_generator\.rpn_head\.conv\.conv(\d+)\.{_W}',
     lambda m: _layer(('rpn_head', f'conv{m[1]}'), m[2], 'conv')),
    (rf'proposal_generator\.rpn_head\.conv\.{_W}',
     lambda m: _layer(('rpn_head', 'conv0'), m[1], 'conv')),
    (rf'proposal_generator\.rpn_head\.objectness_logits\.{_W}',
     lambda m: _layer(('rpn_head', 'objectness'), m[1], 'conv')),
    (rf'proposal_generator\.rpn_head\.anchor_deltas\.{_W}',
     lambda m: _layer(('rpn_head', 'deltas'), m[1], 'conv')),
    (rf'roi_heads\.box_head\.conv(\d+)\.{_W}',
     lambda m: _layer(('box_predictor', f'conv{m[1]}'), m[2], 'conv')),
    (rf'roi_heads\.box_head\.conv(\d+)\.norm\.{_N}',
     lambda m: _norm(('box_predictor', f'norm{m[1]}'), m[2])),
    (rf'roi_heads\.box_head\.fc1\.{_W}',
     lambda m: _layer(('box_predictor', 'fc1'), m[1], 'fc_first')),
    (rf'roi_heads\.box_head\.fc(\d)\.{_W}',
     lambda m: _layer(('box_predictor', f'fc{m[1]}'), m[2], 'linear')),
    (rf'roi_heads\.box_predictor\.cls_score\.{_W}',
     lambda m: _layer(('box_predictor', 'cls_score'), m[1], 'linear', 'cls_score')),
    (rf'roi_heads\.box_predictor\.bbox_pred\.{_W}',
     lambda m: _layer(('box_predictor', 'bbox_pred'), m[1], 'linear', 'bbox_pred')),
    (rf'roi_heads\.mask_head\.mask_fcn(\d)\.{_W}',
     lambda m: _layer(('mask_predictor', f'conv{m[1]}'), m[2], 'conv')),
    (rf'roi_heads\.mask_head\.mask_fcn(\d)\.norm\.{_N}',
     lambda m: _norm(('mask_predictor', f'norm{m[1]}'), m[2])),
    (rf'roi_heads\.mask_head\.deconv\.{_W}',
     lambda m: _layer(('mask_predictor', 'deconv'), m[1], 'deconv')),
    (rf'roi_heads\.mask_head\.predictor\.{_W}',
     lambda m: _layer(('mask_predictor', 'predictor'), m[1], 'conv', 'mask_logits')),
]

RULES = {'torchvision': TORCHVISION_RULES, 'detectron2': DETECTRON2_RULES}

# Tensors that carry no weights: counted, never reported as unused.
IGNORED = re.compile(r'.*num_batches_tracked|pixel_mean|pixel_std|'
                     r'.*anchor_generator\.cell_anchors\.\d+')

_C2_BRANCHES = {'1': 'shortcut', '2a': 'conv1', '2b': 'conv2', '2c': 'conv3'}
_C2_LEAVES = {'w': 'weight', 'bn_s': 'norm.weight', 'bn_b': 'norm.bias',
              'bn_rm': 'norm.running_mean', 'bn_riv': 'norm.running_var'}


def is_caffe2_layout(names) -> bool:
    """Caffe2-era backbones (`R-50.pkl`): `conv1_w`, `res2_0_branch2a_w`, ..."""
    return any(n == 'conv1_w' or re.fullmatch(r'res\d_\d+_branch\w+', n) for n in names)


def c2_to_detectron2(name: str) -> str:
    """Renames one Caffe2 backbone tensor the way Detectron2's loader does;
    other names come back unchanged."""
    if name == 'conv1_w':
        return 'stem.conv1.weight'
    m = re.fullmatch(r'res_conv1_(bn_s|bn_b|bn_rm|bn_riv)', name)
    if m:
        return f'stem.conv1.{_C2_LEAVES[m[1]]}'
    m = re.fullmatch(r'res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|bn_s|bn_b|bn_rm|bn_riv)', name)
    if m:
        return f'res{m[1]}.{m[2]}.{_C2_BRANCHES[m[3]]}.{_C2_LEAVES[m[4]]}'
    return name


_NORM_AFFINE = re.compile(r'(.+\.norm)\.(weight|bias)')


def is_batch_norm(name: str, names) -> bool:
    """A norm's weight or bias whose module also holds `running_mean`: batch norm
    (the R50 LSJ heads' SyncBN), not the LayerNorm that ViTDet's heads keep under
    the same names (see vit_name_maps.py)."""
    m = _NORM_AFFINE.fullmatch(name)
    return bool(m) and f'{m[1]}.running_mean' in names


def target_of(source: str, name: str) -> Target | None:
    """The Detectax variable of one source tensor, or None if it has none."""
    for pattern, make in RULES[source]:
        m = re.fullmatch(pattern, name)
        if m:
            return make(m)
    return None
