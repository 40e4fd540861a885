"""A Detectax step's work and time by model stage, from its HLO and a profile.

FLOPs: the convolutions and dots of the step lowered to HLO (with XLA's own
convolutions where they would run through oneDNN, as benchmark.py's FLOP count
is), each counted as XLA's cost analysis counts it (2 per multiply-add, and for
a convolution only the window taps that fall inside the padded input), and
grouped by the Flax module path in the instruction's `op_name` metadata. An op
whose op_name has `transpose(` in it belongs to the backward pass. The stages
are those torchvision's Mask R-CNN is built of, so that the two sides can be
set row by row (torchvision_child.py counts its side with the same names):

  body        the ResNet backbone
  fpn         the feature pyramid (Detectax's `neck`)
  rpn         the RPN head, its losses and proposals
  roi_align   RoIAlign written as matmuls (torchvision's is a kernel whose work
              its FLOP counter does not see)
  box_head    the RoI box head and its predictor
  mask_head   the mask head and its predictor
  other       the rest (losses, the optimizer, ...)

Time: the thunks of one profiled step of the compiled program (as
benchmarks/profile_step.py reads them), summed by the same stages: thread time,
which can exceed the step's wall time where two thunks run at once.
"""

import collections
import glob
import math
import os
import re
import tempfile

import numpy as np

STAGES = ('body', 'fpn', 'rpn', 'roi_align', 'box_head', 'mask_head', 'other')

# The first pattern found in an op_name (or scope) names its stage.
_STAGE_PATTERNS = (
    ('body', re.compile(r'(^|/)(body|backbone)(/|$)')),
    ('fpn', re.compile(r'(^|/)(neck|fpn)(/|$)')),
    ('rpn', re.compile(r'(^|/)(rpn_head|rpn|MaskRCNN\.propose)(/|$)')),
    ('roi_align', re.compile(r'(^|/)(MaskRCNN\._pool|roi_align|_pool)(/|$)')),
    ('box_head', re.compile(r'(^|/)(box_head|box_predictor)(/|$)')),
    ('mask_head', re.compile(r'(^|/)(mask_head|mask_predictor|MaskRCNN\._mask_logits)(/|$)')),
)

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)\[([0-9,]*)\]\S* (\w[\w\-]*)\((.*)$')
_CALLED = re.compile(r'\b(?:to_apply|calls|body|condition)=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')


def stage_of(op_name: str) -> str:
    """The stage an op_name (a Flax module path, as the HLO metadata has it) belongs to."""
    for stage, pattern in _STAGE_PATTERNS:
        if pattern.search(op_name):
            return stage
    return 'other'


def is_backward(op_name: str) -> bool:
    return 'transpose(' in op_name


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(',') if d]


def _valid_taps(out_size: int, kernel: int, in_size: int, stride: int, pad_lo: int,
                lhs_dilation: int, rhs_dilation: int) -> int:
    """(output, kernel) position pairs of one spatial dimension that read an input
    element, as XLA's HloCostAnalysis counts them (padding and holes are free)."""
    pos = (np.arange(out_size)[:, None] * stride - pad_lo
           + np.arange(kernel)[None, :] * rhs_dilation)
    inside = (pos >= 0) & (pos % lhs_dilation == 0) & (pos // lhs_dilation < in_size)
    return int(inside.sum())


def conv_flops(line: str, out_shape: list[int], lhs: list[int], rhs: list[int]) -> int:
    """FLOPs of an HLO `convolution` instruction (its text and its shapes)."""
    labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', line)
    lhs_l, rhs_l, out_l = labels.groups()
    window = re.search(r'window=\{([^}]*)\}', line)
    fields = dict(f.split('=', 1) for f in window.group(1).split()) if window else {}
    n = len(lhs_l) - 2
    split = lambda key, d: ([int(x) for x in fields[key].split('x')]  # noqa: E731
                            if key in fields else [d] * n)
    sizes, strides = split('size', 1), split('stride', 1)
    lhs_dil, rhs_dil = split('lhs_dilate', 1), split('rhs_dilate', 1)
    pads = [int(p.split('_')[0]) for p in fields['pad'].split('x')] if 'pad' in fields else [0] * n
    groups = int(m.group(1)) if (m := re.search(r'feature_group_count=(\d+)', line)) else 1
    batch_groups = int(m.group(1)) if (m := re.search(r'batch_group_count=(\d+)', line)) else 1
    taps = 1
    for i in range(n):
        d = str(i)
        taps *= _valid_taps(out_shape[out_l.index(d)], sizes[i], lhs[lhs_l.index(d)],
                            strides[i], pads[i], lhs_dil[i], rhs_dil[i])
    fma = (lhs[lhs_l.index('f')] // groups * out_shape[out_l.index('f')]
           * lhs[lhs_l.index('b')] // batch_groups * taps)
    return 2 * fma


def dot_flops(line: str, out_shape: list[int], lhs: list[int]) -> int:
    """FLOPs of an HLO `dot`: 2 * output elements * contracted size."""
    m = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', line)
    contracted = math.prod(lhs[i] for i in _dims(m.group(1))) if m else 1
    return 2 * math.prod(out_shape) * contracted


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """Computation name -> its instruction lines, and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
        if head and not line.startswith(' '):
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif line.startswith('}'):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


_OP_AFTER_TUPLE = re.compile(r'\)\S* (\w[\w\-]*)\(')   # `(s32[], f32[..]) while(`
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _trip_count(line: str, comps: dict[str, list[str]]) -> int | None:
    """Iterations of an HLO `while`: XLA's `known_trip_count` (optimised HLO), else
    the s32 constant its condition compares the counter against with LT (the
    loops `lax.scan` and `lax.map` lower to)."""
    if m := _KNOWN_TRIPS.search(line):
        return int(m.group(1))
    cond = re.search(r'condition=%?([\w.\-]+)', line)
    lines = comps.get(cond.group(1), ()) if cond else ()
    constants = {m.group(1): int(m.group(2)) for l in lines
                 if (m := re.match(r'^\s*%?([\w.\-]+) = s32\[\]\S* constant\((\d+)\)', l))}
    for l in lines:
        if 'compare(' in l and 'direction=LT' in l:
            operands = re.findall(r'%?([\w.\-]+)', l.split('compare(')[1].split(')')[0])
            if operands and operands[-1] in constants:
                return constants[operands[-1]]
    return None


def hlo_flops(hlo_text: str, loop_trips: bool = True) -> collections.Counter:
    """Convolution and dot FLOPs of an HLO module (text with metadata), by op_name.

    An instruction inside a called computation (a `call`, a loop body) has the
    op_name of its call site in front of its own, and counts once per call site;
    a `while` body counts once per iteration (`_trip_count`), or once with
    `loop_trips=False`, as XLA's own cost analysis counts it.
    """
    comps, entry = _computations(hlo_text)
    shapes = {}
    for lines in comps.values():
        for line in lines:
            if m := _INSTR.match(line):
                shapes[m.group(1)] = _dims(m.group(3))
    totals = collections.Counter()

    def visit(comp: str, prefix: str, times: int) -> None:
        for line in comps.get(comp, ()):
            m = _INSTR.match(line)
            op = m.group(4) if m else (t.group(1) if (t := _OP_AFTER_TUPLE.search(line)) else None)
            if op is None:
                continue
            own = re.search(r'op_name="([^"]*)"', line)
            name = '/'.join(p for p in (prefix, own.group(1) if own else '') if p)
            if op in ('convolution', 'dot'):
                operands = re.findall(r'%?([\w.\-]+)', m.group(5).split(')')[0])
                flops = (conv_flops(line, _dims(m.group(3)), shapes[operands[0]],
                                    shapes[operands[1]]) if op == 'convolution'
                         else dot_flops(line, _dims(m.group(3)), shapes[operands[0]]))
                totals[name] += times * flops
            called = _CALLED.findall(line)
            if b := _BRANCHES.search(line):
                called += [c.strip().lstrip('%') for c in b.group(1).split(',')]
            trips = (_trip_count(line, comps) or 1) if op == 'while' and loop_trips else 1
            for c in called:
                if op not in ('reduce', 'reduce-window', 'scatter', 'select-and-scatter', 'sort',
                              'all-reduce', 'map'):   # reducers hold no dots
                    visit(c, name, times * trips)
    visit(entry, '', 1)
    return totals


def loop_flops_uncounted(hlo_text: str) -> float:
    """The convolution and dot FLOPs of a module's loop iterations after the first,
    which XLA's cost analysis (one pass over each loop body) leaves out."""
    return float(sum(hlo_flops(hlo_text).values()) -
                 sum(hlo_flops(hlo_text, loop_trips=False).values()))


def by_stage(totals: collections.Counter) -> dict[str, dict[str, float]]:
    """{stage: {'forward': x, 'backward': y}} from op_name -> amount (FLOPs or us)."""
    out = {s: {'forward': 0.0, 'backward': 0.0} for s in STAGES}
    for name, amount in totals.items():
        out[stage_of(name)]['backward' if is_backward(name) else 'forward'] += amount
    return out


def lowered_stage_flops(lowered) -> tuple[dict, float | None]:
    """Stage FLOPs of a `jax.stages.Lowered` step, and XLA's cost-analysis FLOPs of it."""
    stages = by_stage(hlo_flops(lowered.as_text(dialect='hlo', debug_info=True)))
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return stages, (float(cost['flops']) if cost and 'flops' in cost else None)


def stage_times(step, hlo_text: str) -> dict[str, dict[str, float]]:
    """Seconds of XLA thunk time by stage in one profiled run of `step`, whose
    compiled program's text is `hlo_text`."""
    import jax  # pylint: disable=import-outside-toplevel
    from benchmarks import profile_step  # pylint: disable=import-outside-toplevel
    trace_dir = tempfile.mkdtemp(prefix='detectax_stage_trace_')
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        step()
    trace = sorted(glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'),
                             recursive=True))[-1]
    totals, _ = profile_step.summarise(trace, profile_step.op_scopes(hlo_text), 'scope', 1000)
    return {s: {k: v / 1e6 for k, v in d.items()} for s, d in by_stage(totals).items()}


def table_rows(section: str, dx: dict | None, tv: dict | None, fmt) -> list[tuple]:
    """Per-stage rows: each side's GFLOP (convolutions and dots) and time (ms).

    Detectax's time is XLA thunk time (summed over threads) and its backward is by
    stage; torchvision's forward time is wall time between each stage module's
    hooks, and its backward (FLOPs and time) is one total, in the 'all' rows.
    torchvision's FLOPs and RoIs are its first step's; the RoIs its heads saw after
    the timed steps follow in brackets where they differ (training moves its
    weights, and a diverging RPN leaves fewer proposals).

    Args:
      section: 'inference' or 'train'.
      dx: Detectax's {'flops': {stage: {way: FLOPs}}, 'time_s': {stage: {way: s}},
        'rois': {head: RoIs}}.
      tv: torchvision's per-stage summary of the section (torchvision_child.py).
      fmt: number -> table cell.
    Returns:
      (measure, Detectax, torchvision, Detectax speed-up) rows.
    """
    if not dx and not tv:
        return []
    dx, tv = dx or {}, tv or {}
    get = lambda side, kind, stage, way: side.get(kind, {}).get(stage, {}).get(way)  # noqa: E731
    rows = []
    for head in ('box_head', 'mask_head'):   # the torchvision column: its first step's
        first, timed = tv.get('rois', {}).get(head), tv.get('rois_timed', {}).get(head)
        cell = fmt(first) + (f' ({timed} after the timed steps)'
                             if timed is not None and timed != first else '')
        rows.append((f'{section} {head} RoIs', fmt(dx.get('rois', {}).get(head)), cell, ''))
    ways = ('forward', 'backward') if section == 'train' else ('forward',)
    for way in ways:
        for stage in STAGES + ('all',):
            d_f, t_f = get(dx, 'flops', stage, way), get(tv, 'flops', stage, way)
            d_t = get(dx, 'time_s', stage, way)
            t_t = tv.get('time_s', {}).get('forward', {}).get(stage) if way == 'forward' else None
            if stage == 'all':
                d_f = d_f if d_f is not None else _stage_sum(dx.get('flops'), way)
                d_t = d_t if d_t is not None else _stage_sum(dx.get('time_s'), way)
                if way == 'backward':   # the backward pass, as the child marks it
                    t_t = tv.get('time_s', {}).get('phases', {}).get('backward')
                elif t_t is None:
                    t_t = _stage_sum({s: {'forward': v} for s, v in
                                      tv.get('time_s', {}).get('forward', {}).items()}, way)
            ratio = t_t / d_t if d_t and t_t else None
            rows.append((f'{section} {stage} {way} GFLOP', fmt(d_f and d_f / 1e9),
                         fmt(t_f and t_f / 1e9), ''))
            rows.append((f'{section} {stage} {way} time (ms)', fmt(d_t and 1e3 * d_t),
                         fmt(t_t and 1e3 * t_t), fmt(ratio) + ('x' if ratio else '')))
    return rows


def _stage_sum(by_stage: dict | None, way: str) -> float | None:
    if not by_stage:
        return None
    return sum(v.get(way) or 0.0 for s, v in by_stage.items() if s != 'all')
