"""Converts torchvision or Detectron2 Mask R-CNN weights into a Detectax checkpoint.

  python -m projects.maskrcnn.tools.convert_checkpoint --source=torchvision \\
      maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth /tmp/tv_maskrcnn
  python -m projects.maskrcnn.tools.convert_checkpoint --source=detectron2 \\
      model_final_f10217.pkl /tmp/d2_maskrcnn_r50_1x

then `python -m projects.maskrcnn.predict --checkpoint=/tmp/tv_maskrcnn ...` or
`--config.init_from.checkpoint_path=/tmp/tv_maskrcnn` with the matching config
(configs/maskrcnn_r50_fpn_torchvision_coco.py, configs/maskrcnn_*_detectron2_coco.py).
Backbone-only files (torchvision's `resnet50` ImageNet weights, Detectron2's
`R-50.pkl`) convert the same way and initialise only the backbone.

Inputs: a torchvision state dict `.pth` (read by `torch.load(weights_only=True)`
where torch is installed, else by a restricted reader of torch's zip format) or
a Detectron2 `.pkl` (read by a restricted unpickler); see safe_load.py.

Layout changes: convolution kernels OIHW -> HWIO; linear weights transposed;
the first box-head FC, which torch applies to RoI features flattened as
(C, H, W), gets its rows reordered to our (H, W, C) flattening; transposed-conv
kernels [in, out, kh, kw] -> [kh, kw, in, out] (Upsample2xConv's layout).
Class heads: torchvision's COCO heads have 91 outputs indexed by COCO category
id with background at 0; by default the 80 used ids are kept, in id order, so
that class k of the converted model is the dataset's k-th category (the order
of the COCO annotation file); `--all_classes` keeps all 90. Detectron2 puts
background last in cls_score; it is moved first. Class-specific box and mask
outputs for the background class (torchvision) are dropped.
Detectron2's MSRA weights take BGR images; the first conv's input channels are
reversed so that the converted model takes RGB like most Detectax configs
(which then give the pixel mean in RGB order). A config that feeds BGR itself
(maskrcnn_r50_fpn_lsj_100ep_coco.py, as Detectron2's LSJ recipe) takes the file
converted with `--model_input=bgr`, which keeps the channels as they are.

Output: an orbax checkpoint directory holding {'params', 'model_state':
{'frozen', 'batch_stats'}} (batch-norm statistics are written for both the
frozen-BN and the trainable-BN layouts), `conversion.json`, the report of
what went where and what was left unused, and for COCO heads `categories.json`
(the ids and names of classes 1..K: the 80 COCO 2017 categories, or the 90 ids
with `--all_classes`), which predict.py and export.py read to name the classes.
The directory is a checkpoint for `init_from`, predict.py and export.py alike.
"""

import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np

from projects.maskrcnn.data import coco_categories
from projects.maskrcnn.tools import name_maps, safe_load, vit_name_maps

SOURCES = ('torchvision', 'detectron2', 'mae')
# The cell-anchor order of each source's RPN channels (model.anchors.order).
ANCHOR_ORDER = {'torchvision': 'ratio_major', 'detectron2': 'size_major'}
# The 80 category ids of COCO 2017, in the annotation file's order.
COCO_CATEGORY_IDS = tuple(i for i, _ in coco_categories.CATEGORIES)
CATEGORIES_FILENAME = 'categories.json'


@dataclasses.dataclass
class Conversion:
    """variables: {'params': ..., 'frozen': ...} nested dicts (frozen-BN layout).
    loaded: source name -> Detectax path. unused / ignored: source names.
    notes: what else was done (class mapping, channel order, filled statistics).
    categories: (COCO id, name) of classes 1..K where the heads are COCO's, else None."""
    variables: dict[str, Any]
    loaded: dict[str, str]
    unused: list[str]
    ignored: list[str]
    notes: list[str]
    categories: list[tuple[int, str]] | None = None


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------

def read_source(path: str, source: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a checkpoint file into {name: float32/int array} and its metadata."""
    if source not in SOURCES:
        raise ValueError(f'unknown --source={source!r}; expected one of {SOURCES}')
    if path.endswith('.pkl'):
        data = safe_load.load_pickle(path)
    else:
        data = safe_load.load_torch_state_dict(path)
    meta = {}
    if isinstance(data, dict) and 'blobs' in data and isinstance(data['blobs'], dict):
        data = data['blobs']  # Caffe2 detection models
    if isinstance(data, dict) and isinstance(data.get('model'), dict):
        meta = {k: v for k, v in data.items() if k != 'model' and isinstance(v, (str, bool))}
        data = data['model']
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a dict of arrays, got {type(data).__name__}')
    state = {}
    for name, value in data.items():
        if str(name).endswith('_momentum'):
            continue  # Caffe2 optimizer state
        array = np.asarray(value)
        if array.dtype.kind not in 'fiub':
            raise ValueError(f'{path}: {name} is not a numeric array ({array.dtype})')
        state[str(name)] = array.astype(np.float32) if array.dtype.kind == 'f' else array
    return state, meta


# ----------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------

def _fc_first(weight: np.ndarray, channels: int) -> np.ndarray:
    """[out, C*R*R] over (C, R, R)-flattened features -> [R*R*C, out] over (R, R, C)."""
    out, fan_in = weight.shape
    side = int(round(math.sqrt(fan_in / channels)))
    if side * side * channels != fan_in:
        raise ValueError(f'box head fc1 takes {fan_in} inputs, not C x R x R with C={channels}')
    return weight.reshape(out, channels, side, side).transpose(2, 3, 1, 0).reshape(-1, out)


def _to_detectax(array: np.ndarray, kind: str, pooled_channels: int | None,
                 reverse_input_channels: bool) -> np.ndarray:
    if kind in ('conv', 'stem_conv'):
        if kind == 'stem_conv' and reverse_input_channels:
            array = array[:, ::-1]
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if kind == 'linear':
        return np.ascontiguousarray(array.T)
    if kind == 'fc_first':
        if pooled_channels is None:
            raise ValueError('cannot infer the RoI feature channels for the box head fc1: '
                             'the checkpoint has no FPN output convolutions')
        return _fc_first(array, pooled_channels)
    if kind == 'deconv':
        return np.ascontiguousarray(array.transpose(2, 3, 0, 1))
    return array  # 'vector', 'norm'


def _class_rows(head: str, rows: int, source: str, class_ids: Sequence[int]) -> np.ndarray | None:
    """Rows of a class-indexed output to keep, in Detectax order (None: all).

    `class_ids` are the source's indices of our classes 1..K: torchvision
    counts background as 0, Detectron2 counts foreground from 0.
    """
    ids = np.asarray(class_ids, np.int64)
    per_class = 4 if head == 'bbox_pred' else 1
    if head == 'cls_score':
        background = 0 if source == 'torchvision' else rows - 1
        return np.concatenate([[background], ids])
    if rows == per_class:
        return None  # class-agnostic
    return (ids[:, None] * per_class + np.arange(per_class)).reshape(-1)


def _num_source_classes(state, targets, source) -> int:
    """Foreground classes of the source's classifier (0 if it has none)."""
    for name, target in targets.items():
        if target.head == 'cls_score':
            return state[name].shape[0] - 1
    return 0


def coco_categories_of(source: str, num_source_classes: int,
                       class_ids: Sequence[int]) -> list[tuple[int, str]] | None:
    """(COCO id, name) of our classes where the source's heads are COCO's: torchvision's
    91-way heads index the COCO ids themselves, Detectron2's 80-way heads the 80
    categories in id order. None for other heads and for backbone-only files."""
    if source == 'torchvision' and num_source_classes == 90:
        names = dict(coco_categories.ALL_90)
        return [(int(i), names[int(i)]) for i in class_ids]
    if source == 'detectron2' and num_source_classes == len(coco_categories.CATEGORIES):
        return [coco_categories.CATEGORIES[int(i)] for i in class_ids]
    return None


def default_class_ids(source: str, num_source_classes: int, all_classes: bool) -> list[int]:
    """Source indices of our classes: COCO's 80 ids out of torchvision's 91-way
    heads unless `all_classes`; otherwise every foreground class in order."""
    if source == 'torchvision':
        if num_source_classes == 90 and not all_classes:
            return list(COCO_CATEGORY_IDS)
        return list(range(1, num_source_classes + 1))
    return list(range(num_source_classes))


# ----------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------

def _set(tree: dict, path: Sequence[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _pooled_channels(state, targets) -> int | None:
    for name, target in targets.items():
        if target.module[0] == 'neck' and target.module[1].startswith('output') \
                and target.leaf == 'kernel':
            return int(state[name].shape[0])
    return None


def _target_of(source: str, name: str, state: Mapping[str, np.ndarray]):
    # Batch-normed heads (R50 LSJ) take the ResNet detector's rules before ViTDet's,
    # whose rules read `box_head.conv1.norm.weight` as a LayerNorm.
    if source == 'detectron2' and name_maps.is_batch_norm(name, state):
        return name_maps.target_of(source, name)
    return vit_name_maps.target_of(source, name, state) or (
        name_maps.target_of(source, name) if source in name_maps.RULES else None)


def convert(state: Mapping[str, np.ndarray], source: str, *,
            class_ids: Sequence[int] | None = None, all_classes: bool = False,
            reverse_input_channels: bool = False) -> Conversion:
    """Maps a source state dict onto Detectax variables.

    Args:
      state: {source name: array}, torch layouts.
      source: 'torchvision' or 'detectron2'.
      class_ids: source indices of our classes 1..K (see `_class_rows`); by
        default `default_class_ids(source, ..., all_classes)`.
      reverse_input_channels: reverse the first conv's input channels
        (BGR-trained weights fed RGB images).
    """
    if source not in SOURCES:
        raise ValueError(f'unknown source {source!r}; expected one of {SOURCES}')
    notes = []
    state = dict(state)
    if source == 'detectron2' and name_maps.is_caffe2_layout(state):
        state = {name_maps.c2_to_detectron2(k): v for k, v in state.items()}
        notes.append('Caffe2 backbone names renamed as Detectron2 does')
    targets, unused, ignored = {}, [], []
    dropped = vit_name_maps.dropped(source, state)
    if dropped:
        notes.append(f'dropped (no place in ViTDet): {", ".join(dropped)}')
    for name in state:
        target = _target_of(source, name, state)
        if target is not None:
            targets[name] = target
        elif name_maps.IGNORED.fullmatch(name) or name in dropped:
            ignored.append(name)
        else:
            unused.append(name)
    num_classes = _num_source_classes(state, targets, source)
    if class_ids is None:
        class_ids = default_class_ids(source, num_classes, all_classes)
    if num_classes:
        notes.append(f'{len(class_ids)} classes kept; source indices {list(class_ids)}')
    if reverse_input_channels and any(t.kind == 'stem_conv' for t in targets.values()):
        notes.append('first conv input channels reversed (BGR <-> RGB: the weights and '
                     'the images come in opposite channel orders)')
    pooled = vit_name_maps.pooled_channels(state) or _pooled_channels(state, targets)
    variables: dict[str, Any] = {}
    loaded = {}
    for name, target in targets.items():
        array = state[name]
        if target.head is not None:
            rows = _class_rows(target.head, array.shape[0], source, class_ids)
            array = array if rows is None else array[rows]
        array = _to_detectax(array, target.kind, pooled, reverse_input_channels)
        path = ('frozen' if target.kind == 'norm' else 'params',) + target.module + (target.leaf,)
        _set(variables, path, array)
        loaded[name] = '/'.join(path)
    notes += _fill_missing_statistics(variables)
    if any(t.module[:1] == ('rpn_head',) for t in targets.values()):
        notes.append(f"RPN channels in {source}'s cell-anchor order: "
                     f"model.anchors.order='{ANCHOR_ORDER[source]}'")
    categories = coco_categories_of(source, num_classes, class_ids) if num_classes else None
    return Conversion(variables, loaded, sorted(unused), sorted(ignored), notes, categories)


def _fill_missing_statistics(variables: dict) -> list[str]:
    """Caffe2 backbones fold batch norm into scale and bias; give them mean 0
    and variance 1, as Detectron2's FrozenBatchNorm2d does when loading them."""
    filled = 0
    for norm in _norms(variables.get('frozen', {})):
        if 'scale' in norm and 'mean' not in norm:
            norm['mean'] = np.zeros_like(norm['scale'])
            norm['var'] = np.ones_like(norm['scale'])
            filled += 1
    return [f'batch-norm mean 0 and variance 1 filled in for {filled} norms'] if filled else []


def _norms(tree: dict):
    """The dicts of norm vectors in a frozen tree (those holding a 'scale')."""
    if 'scale' in tree:
        yield tree
    for value in tree.values():
        if isinstance(value, dict):
            yield from _norms(value)


def trainable_bn_layout(frozen: dict) -> tuple[dict, dict]:
    """The same statistics laid out for a trainable-BN ('bn') backbone:
    ({... 'scale', 'bias'} for params, {... 'mean', 'var'} for batch_stats)."""
    params, stats = {}, {}

    def visit(tree, path):
        for key, value in tree.items():
            if isinstance(value, dict):
                visit(value, path + (key,))
            else:
                _set(stats if key in ('mean', 'var') else params, path + (key,), value)

    visit(frozen, ())
    return params, stats


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------

def save(conversion: Conversion, output_dir: str, input_path: str = '',
         source: str = '') -> str:
    """Writes the orbax checkpoint and conversion.json; returns the directory."""
    import orbax.checkpoint as ocp  # the project's dependency; heavy, so imported here

    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir):
        raise FileExistsError(f'{output_dir} exists; choose a new OUTPUT_DIR')
    params, frozen = conversion.variables.get('params', {}), conversion.variables.get('frozen')
    tree = {'params': params, 'model_state': {}}
    if frozen:  # both batch-norm layouts: frozen_bn and trainable bn backbones load it
        bn_params, bn_stats = trainable_bn_layout(frozen)
        tree = {'params': _merge(params, bn_params),
                'model_state': {'frozen': frozen, 'batch_stats': bn_stats}}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(output_dir, tree)
    checkpointer.wait_until_finished()
    report = {'input': input_path, 'source': source, 'notes': conversion.notes,
              'categories': categories_note(conversion),
              'loaded': conversion.loaded, 'unused': conversion.unused,
              'ignored': conversion.ignored}
    with open(os.path.join(output_dir, 'conversion.json'), 'w') as f:
        json.dump(report, f, indent=1)
    if conversion.categories:  # predict and export name the classes from it
        with open(os.path.join(output_dir, CATEGORIES_FILENAME), 'w', encoding='utf-8') as f:
            json.dump(coco_categories.as_json(conversion.categories), f, indent=1)
    return output_dir


def categories_note(conversion: Conversion) -> str:
    """Which categories.json the conversion writes, if any, and why."""
    if conversion.categories:
        what = ('the 80 COCO 2017 categories' if len(conversion.categories) == 80 else
                f'{len(conversion.categories)} COCO categories')
        return f'{CATEGORIES_FILENAME}: {what} (ids and names)'
    if 'params/box_predictor/cls_score/kernel' not in conversion.loaded.values():
        return f'no {CATEGORIES_FILENAME}: no class head (a backbone-only file)'
    return (f'no {CATEGORIES_FILENAME}: the class head is not a COCO head; give predict '
            f'and export --categories=FILE to name its classes')


def nothing_converts_message(path: str, source: str, conversion: Conversion,
                             shown: int = 8) -> str:
    """Why a file gave no tensor of a --source model, naming its first keys."""
    unknown = conversion.unused
    listed = ', '.join(unknown[:shown]) + (f', ... ({len(unknown)} in all)'
                                           if len(unknown) > shown else '')
    return (f'{path}: no tensor converts to a Detectax model from --source={source}; '
            f'its first unknown keys: {listed or "none (the file holds no tensors)"}. '
            f'Is it a {source} Mask R-CNN or backbone checkpoint? Nothing was written.')


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog='python -m projects.maskrcnn.tools.convert_checkpoint',
        description=__doc__.split('\n\n')[0])
    parser.add_argument('--source', required=True, choices=SOURCES)
    parser.add_argument('--all_classes', action='store_true',
                        help="keep all of torchvision's 90 COCO ids instead of the 80 used")
    parser.add_argument('--source_input', default='auto', choices=('auto', 'bgr', 'rgb'),
                        help='channel order the source model was trained on; auto: BGR for '
                             'Detectron2 files (except torchvision-converted ones), else RGB')
    parser.add_argument('--model_input', default='rgb', choices=('rgb', 'bgr'),
                        help="channel order the config feeds the model (its "
                             "dataset_configs.channel_order); the first conv's input channels "
                             "are reversed where it differs from the source's")
    parser.add_argument('input')
    parser.add_argument('output_dir')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        state, meta = read_source(args.input, args.source)
    except (ValueError, pickle.UnpicklingError) as e:  # each names the file
        print(f'error: {e}', file=sys.stderr)
        return 1
    bgr = args.source_input == 'bgr' or (
        args.source_input == 'auto' and args.source == 'detectron2'
        and meta.get('__author__') != 'torchvision')
    conversion = convert(state, args.source, all_classes=args.all_classes,
                         reverse_input_channels=bgr != (args.model_input == 'bgr'))
    if bgr and args.model_input == 'bgr':
        conversion.notes.append("first conv kept in BGR order: the config feeds BGR images "
                                "(dataset_configs.channel_order='BGR')")
    if not conversion.loaded:
        print(f'error: {nothing_converts_message(args.input, args.source, conversion)}',
              file=sys.stderr)
        return 1
    out = save(conversion, args.output_dir, args.input, args.source)
    print(f'{len(conversion.loaded)} tensors converted into {out}')
    print(f'  {categories_note(conversion)}')
    for note in conversion.notes:
        print(f'  {note}')
    if conversion.unused:
        print(f'  unused ({len(conversion.unused)}): {", ".join(conversion.unused)}')
    print(f'Use it with --config.init_from.checkpoint_path={out}, or as predict\'s and '
          f'export\'s --checkpoint={out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
