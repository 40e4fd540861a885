"""torchvision's Mask R-CNN step, its FLOPs and forward time by stage.

Used by torchvision_child.py (so it imports torch only). The stages are those of
benchmarks/stage_flops.py, Detectax's side: body, fpn, rpn, roi_align,
box_head, mask_head and other (the FLOPs outside those modules: the transform,
the losses, the optimizer). torch's FLOP counter
(`torch.utils.flop_counter.FlopCounterMode`) counts matmuls and convolutions and
gives RoIAlign, a kernel of its own, no FLOPs, so torchvision's roi_align row is
0 by construction. The backward pass is given as one total (stage 'all'): the
counter's module tracker leaves several modules open during the backward pass,
so it attributes some backward FLOPs to two stages at once.

Each count runs one extra step, on a copy of the model before the timed steps
(torchvision_child.py), so the timed steps carry neither the counter's nor the
hooks' overhead.
"""

import collections
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

STAGES = ('body', 'fpn', 'rpn', 'roi_align', 'box_head', 'mask_head', 'other')

# Module path (under torchvision's MaskRCNN) -> stage.
STAGE_MODULES = {
    'backbone.body': 'body',
    'backbone.fpn': 'fpn',
    'rpn': 'rpn',
    'roi_heads.box_roi_pool': 'roi_align',
    'roi_heads.mask_roi_pool': 'roi_align',
    'roi_heads.box_head': 'box_head',
    'roi_heads.box_predictor': 'box_head',
    'roi_heads.mask_head': 'mask_head',
    'roi_heads.mask_predictor': 'mask_head',
}


def _by_stage(counts: dict[str, dict], root: str) -> dict[str, float]:
    """FlopCounterMode's per-module counts -> FLOPs per stage ('other': the rest)."""
    total = lambda name: float(sum(counts.get(name, {}).values()))  # noqa: E731
    out = dict.fromkeys(STAGES, 0.0)
    for path, stage in STAGE_MODULES.items():
        out[stage] += total(f'{root}.{path}')
    out['other'] = total('Global') - sum(out.values())
    return out


def _count_rois(model: torch.nn.Module, rois: dict) -> list:
    """Hooks that record how many RoIs the box and mask heads see (their handles)."""
    heads = model.roi_heads
    record = lambda name: lambda _m, args: rois.__setitem__(name, int(args[0].shape[0]))  # noqa
    return [heads.box_head.register_forward_pre_hook(record('box_head')),
            heads.mask_head.register_forward_pre_hook(record('mask_head'))]


def count_flops(step, model: torch.nn.Module) -> dict:
    """{'flops': {stage: {'forward': FLOPs}}, 'rois': {head: RoIs}} of one run of
    `step`; the flops' stage 'all' has the forward and the backward FLOPs.

    `step(phases)` must call `phases.mark('backward')` when its forward pass ends
    (or never, for inference): the counts so far are the forward's.
    """
    root = type(model).__name__
    counter = FlopCounterMode(display=False, depth=None)
    marks, rois = _Marks(), {}
    handles = _count_rois(model, rois)
    with counter:
        marks.on_mark = lambda _: marks.snapshots.append(
            {k: dict(v) for k, v in counter.flop_counts.items()})
        step(marks)
    for h in handles:
        h.remove()
    after = counter.get_flop_counts()
    before = marks.snapshots[0] if marks.snapshots else after
    forward = sum(before.get('Global', {}).values())
    out = {s: {'forward': f} for s, f in _by_stage(before, root).items()}
    out['all'] = {'forward': float(forward),
                  'backward': float(sum(after.get('Global', {}).values()) - forward)}
    return {'flops': out, 'rois': rois}


class _Marks:
    """What a step calls at its phase boundaries: counts or times them."""

    def __init__(self):
        self.snapshots, self.times = [], collections.Counter()
        self.on_mark = lambda name: None
        self._phase, self._start = 'forward', time.perf_counter()

    def mark(self, name: str, sync=lambda: None) -> None:
        sync()
        now = time.perf_counter()
        self.times[self._phase] += now - self._start
        self._phase, self._start = name, now
        self.on_mark(name)

    def end(self, sync=lambda: None) -> None:
        self.mark('end', sync)


def time_stages(step, model: torch.nn.Module, sync=lambda: None) -> dict:
    """Seconds of one run of `step`: each stage's forward (module hooks, wall time)
    and the whole backward pass and optimizer update (the step's phase marks)."""
    modules = dict(model.named_modules())
    forward = collections.Counter()
    starts, handles = {}, []
    for path, stage in STAGE_MODULES.items():
        module = modules.get(path)
        if module is None:
            raise KeyError(f'torchvision MaskRCNN has no module {path!r} (STAGE_MODULES)')

        def pre(_m, _a, path=path):
            sync()
            starts[path] = time.perf_counter()

        def post(_m, _a, _o, path=path, stage=stage):
            sync()
            forward[stage] += time.perf_counter() - starts.pop(path)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    marks = _Marks()
    try:
        step(marks)
        marks.end(sync)
    finally:
        for h in handles:
            h.remove()
    return {'time_s': {'forward': {s: forward.get(s, 0.0) for s in STAGES},
                       'phases': dict(marks.times)}}


def count_rois(step, model: torch.nn.Module) -> dict[str, int]:
    """The RoIs the box and mask heads see in one run of `step`."""
    rois = {}
    handles = _count_rois(model, rois)
    try:
        step(_Marks())
    finally:
        for h in handles:
            h.remove()
    return rois
