r"""Where a compiled Detectax step spends its time: a jax.profiler trace, summed.

  python -m benchmarks.profile_step --config=configs/maskrcnn_r50_fpn_torchvision_coco.py \
      --height=800 --width=1216 --batch=1 --mode=inference --top=30

Traces `--steps` runs (default 3; 1 is enough) of the compiled inference (or training) step after one
warm-up, reads the Perfetto JSON the profiler writes, and prints the XLA
operations' total time grouped by op (`--by=op`) or by the model scope in
the op's name (`--by=scope`, the first `--depth` parts after the jit name).
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

from absl import app, flags
import jax

from benchmarks import benchmark

# --config, --height, --width, --batch, --mode and --steps are benchmark.py's flags.
_CONFIG, _HEIGHT, _WIDTH, _BATCH = (benchmark._CONFIG, benchmark._HEIGHT, benchmark._WIDTH,
                                    benchmark._BATCH)
_MODE, _STEPS = benchmark._MODE, benchmark._STEPS
_TOP = flags.DEFINE_integer('top', 30, 'Rows to print.')
_BY = flags.DEFINE_enum('by', 'op', ['op', 'scope'], 'Grouping.')
_DEPTH = flags.DEFINE_integer('depth', 2, 'Scope parts kept with --by=scope.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', None, 'Keep the trace here (default: a tmp dir).')


def summarise(trace_file: str, by: str, depth: int) -> tuple[collections.Counter, float]:
    """Sums the durations (us) of complete events on XLA threads by name or scope."""
    with gzip.open(trace_file, 'rt') as f:
        events = json.load(f)
    events = events['traceEvents'] if isinstance(events, dict) else events
    totals = collections.Counter()
    for e in events:
        if e.get('ph') != 'X' or 'dur' not in e:
            continue
        args = e.get('args', {})
        name = e.get('name', '')
        long_name = args.get('long_name', '') or args.get('tf_op', '') or ''
        if by == 'scope':
            scope = args.get('tf_op') or args.get('name') or ''
            if not scope:
                continue
            parts = [p for p in scope.split('/') if p and not p.startswith('jit(')]
            key = '/'.join(parts[:depth]) or name
        else:
            if not (re.match(r'^[a-z_\-]+(\.[0-9]+)?$', name) or long_name):
                continue
            key = name
        totals[key] += e['dur']
    return totals, sum(totals.values())


def main(argv):
    del argv
    config = _CONFIG.value
    stride = 2 ** (len(config.model.anchors.sizes) + 1)
    padded = benchmark.padded_size(_HEIGHT.value, _WIDTH.value, stride)
    config.dataset_configs.image_size = padded
    meta = {'num_classes': 80, 'input_shape': (-1, *padded, 3),
            'max_instances': config.dataset_configs.get('max_instances', 100),
            'gt_mask_size': config.dataset_configs.get('gt_mask_size', 28)}
    batch = benchmark.synthetic_batch(config, _BATCH.value, _HEIGHT.value, _WIDTH.value, padded,
                                      3, 80)
    model, tx, state = benchmark.build_state(config, meta)
    if _MODE.value == 'both':
        raise app.UsageError('--mode must be inference or train')
    if _MODE.value == 'inference':
        images = {k: batch[k] for k in ('image', 'image_size')}
        fn = jax.jit(lambda s, b: benchmark.trainer.eval_step(s, b, model=model))
        args = (state, images)
        step = lambda: jax.block_until_ready(fn(*args))  # noqa: E731
    else:
        fn = jax.jit(lambda s, b: benchmark.trainer.train_step(s, b, model=model, tx=tx))
        step = lambda: jax.block_until_ready(fn(state, batch))  # noqa: E731
    step()
    trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix='detectax_trace_')
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(_STEPS.value):
            step()
    trace_file = sorted(glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'),
                                  recursive=True))[-1]
    totals, total = summarise(trace_file, _BY.value, _DEPTH.value)
    print(f'trace: {trace_file}; {total / 1e3 / _STEPS.value:.1f} ms of ops per step')
    for key, us in totals.most_common(_TOP.value):
        print(f'{us / 1e3 / _STEPS.value:10.1f} ms  {100 * us / total:5.1f}%  {key}')


if __name__ == '__main__':
    app.run(main)
