r"""Where a compiled Detectax step spends its time: a jax.profiler trace, summed.

  python -m benchmarks.profile_step --config=configs/maskrcnn_r50_fpn_torchvision_coco.py \
      --height=800 --width=1216 --batch=1 --mode=inference --top=30

Traces `--steps` runs (1 is enough) of the compiled inference or training step
after a warm-up, reads the Perfetto JSON the profiler writes, and prints the XLA
thunks' total time by HLO op (`--by=op`) or by the model scope in the op's
metadata (`--by=scope`, the first `--depth` parts after the jit name). The
step's HLO is kept next to the trace (step.hlo.txt) to look ops up.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app, flags
import jax

from benchmarks import benchmark
from projects.maskrcnn.kernels import host_memory

# Flag holders, set by define_flags(): benchmark.py's --config, --height, --width,
# --batch, --mode and --steps, and this command's own.
_CONFIG = _HEIGHT = _WIDTH = _BATCH = _MODE = _STEPS = None
_TOP = _BY = _DEPTH = _TRACE_DIR = None


def define_flags() -> None:
    global _CONFIG, _HEIGHT, _WIDTH, _BATCH, _MODE, _STEPS  # pylint: disable=global-statement
    global _TOP, _BY, _DEPTH, _TRACE_DIR  # pylint: disable=global-statement
    benchmark.define_flags()
    _CONFIG, _HEIGHT, _WIDTH, _BATCH = (benchmark._CONFIG, benchmark._HEIGHT, benchmark._WIDTH,
                                        benchmark._BATCH)
    _MODE, _STEPS = benchmark._MODE, benchmark._STEPS
    _TOP = flags.DEFINE_integer('top', 30, 'Rows to print.')
    _BY = flags.DEFINE_enum('by', 'op', ['op', 'scope'], 'Grouping.')
    _DEPTH = flags.DEFINE_integer('depth', 3, 'Scope parts kept with --by=scope.')
    _TRACE_DIR = flags.DEFINE_string('trace_dir', None,
                                     'Keep the trace here (default: a tmp dir).')


def op_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the jax op_name in its metadata (the model scope);
    for a fusion without one, the first op_name inside the computation it calls."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(
        r'^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo_text, re.M | re.S)}
    scopes = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = ([^\n]*)', hlo_text, re.M):
        name, rest = m.group(1), m.group(2)
        found = re.search(r'op_name="([^"]+)"', rest)
        if not found and (called := re.search(r'calls=%?([\w.\-]+)', rest)):
            found = re.search(r'op_name="([^"]+)"', bodies.get(called.group(1), ''))
        # Kernel-gradient convolutions carry no op_name: name them by their output shape.
        scopes.setdefault(name, found.group(1) if found else f'(no scope) {rest.split()[0]}')
    return scopes


_ENCLOSING = re.compile(r'(while|conditional)(\.\d+)?')


def summarise(trace_file: str, scopes: dict[str, str], by: str, depth: int
              ) -> tuple[collections.Counter, float]:
    """Sums the durations (us) of the XLA thunks in the trace, by HLO op or by scope.

    Thunks on the two XLA threads can overlap, so the sum can exceed the wall time.
    A loop's or conditional's own thunk spans the thunks of its body, which the
    trace also holds: it is left out, so that no time counts twice.
    """
    with gzip.open(trace_file, 'rt') as f:
        events = json.load(f)
    events = events['traceEvents'] if isinstance(events, dict) else events
    totals = collections.Counter()
    for e in events:
        op = e.get('args', {}).get('hlo_op')
        if e.get('ph') != 'X' or 'dur' not in e or not op or _ENCLOSING.fullmatch(op):
            continue
        if by == 'scope':
            parts = [p for p in scopes.get(op, op).split('/') if not p.startswith('jit(')]
            key = '/'.join(parts[:depth])
        else:
            key = f'{op}  {scopes.get(op, "")}'
        totals[key] += e['dur']
    return totals, sum(totals.values())


def main(argv):
    del argv
    config = _CONFIG.value
    stride = 2 ** (len(config.model.anchors.sizes) + 1)
    padded = benchmark.padded_size(_HEIGHT.value, _WIDTH.value, stride)
    config.dataset_configs.image_size = padded
    meta = {'num_classes': benchmark._NUM_CLASSES.value, 'input_shape': (-1, *padded, 3),
            'max_instances': config.dataset_configs.get('max_instances', 100),
            'gt_mask_size': config.dataset_configs.get('gt_mask_size', 28)}
    batch = benchmark.synthetic_batch(config, _BATCH.value, _HEIGHT.value, _WIDTH.value, padded,
                                      benchmark._INSTANCES.value, benchmark._NUM_CLASSES.value)
    model, tx, state = benchmark.build_state(config, meta)
    if _MODE.value == 'both':
        raise app.UsageError('--mode must be inference or train')
    if _MODE.value == 'inference':
        images = {k: batch[k] for k in ('image', 'image_size')}
        fn = jax.jit(lambda s, b: benchmark.step_lib.eval_step(s, b, model=model))
        fn = fn.lower(state, images).compile()
        step = lambda: jax.block_until_ready(fn(state, images))  # noqa: E731
    else:
        fn = jax.jit(lambda s, b: benchmark.step_lib.train_step(s, b, model=model, tx=tx))
        fn = fn.lower(state, batch).compile()
        step = lambda: jax.block_until_ready(fn(state, batch))  # noqa: E731
    step()
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix='detectax_trace_')
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(_STEPS.value):
            step()
    trace_file = sorted(glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'),
                                  recursive=True))[-1]
    hlo = fn.as_text()
    with open(os.path.join(trace_dir, 'step.hlo.txt'), 'w') as f:
        f.write(hlo)
    scopes = op_scopes(hlo)
    totals, total = summarise(trace_file, scopes, _BY.value, _DEPTH.value)
    print(f'trace: {trace_file}; untraced step {wall:.2f} s; {total / 1e3 / _STEPS.value:.1f} ms '
          f'of XLA thunks per traced step (summed over threads)')
    for key, us in totals.most_common(_TOP.value):
        print(f'{us / 1e3 / _STEPS.value:10.1f} ms  {100 * us / total:5.1f}%  {key}')


if __name__ == '__main__':
    host_memory.keep_freed_memory()  # as benchmark.py and main.py do
    define_flags()
    app.run(main)
