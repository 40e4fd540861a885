r"""Detectax speed and memory for a config, side by side with torchvision.

  python -m benchmarks.benchmark --config=configs/maskrcnn_r50_fpn_torchvision_coco.py \
      --height=800 --width=1216 --batch=1 --mode=inference --steps=3 \
      --torchvision_python=/work/torchvenv/bin/python --append=BENCHMARKS.md

Detectax (this process): the config's model with random weights and 80 classes,
on a batch of random images of HxW padded up to the config's required multiple
(the largest FPN stride, 64 for five anchor levels) with the valid size HxW.
It measures compile time (lower + compile), inference latency (median of
`--steps` runs after `--warmup`) and images/s, training images/s (the trainer's
`train_step` and optimizer, donated state), peak host RSS, peak device memory
(None on CPU), the steps' FLOPs from XLA's cost analysis (of the step lowered
with XLA's own convolutions where they run through oneDNN; the loop iterations
it leaves out added, stage_flops.loop_flops_uncounted) and the
fraction of `--peak_flops` they achieve (by default a measured matmul rate on
this machine in the config's dtype, said so in the table).

torchvision (a child process run with `--torchvision_python`, see
torchvision_child.py): maskrcnn_resnet50_fpn with the same image size, batch,
proposal counts and RoI batch, 100 detections and no score threshold.

The two sides take turns: after each Detectax step (warm-up steps included) the
child runs one torchvision step of the same kind (benchmarks/turns.py), so both
medians come from the same stretch of a shared machine's load; each side times
only its own steps. The table gives the ratio torchvision time / Detectax time
(above 1: Detectax faster).

By stage (`--stages`, on by default; benchmarks/stage_flops.py and
torchvision_stages.py): after the timed steps each side runs its step again to
count its convolution and dot FLOPs by stage (body, fpn, rpn, roi_align,
box_head, mask_head, other; forward and backward) and once more to time the
stages; the table gives both sides' GFLOP and milliseconds per stage.
"""

import datetime
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from benchmarks import stage_flops, turns
from benchmarks.memory import peak_rss_mb
from projects.maskrcnn import optim
from projects.maskrcnn import steps as step_lib
from projects.maskrcnn.kernels import host_memory, onednn
from projects.maskrcnn.model import MaskRCNNModel

# Flag holders, set by define_flags() when run as a command (importing the module
# defines no flags, so tests and other commands can import it).
_CONFIG = _HEIGHT = _WIDTH = _BATCH = _MODE = _STEPS = _WARMUP = None
_NUM_CLASSES = _INSTANCES = _TV_PYTHON = _TV_THREADS = _APPEND = _PEAK_FLOPS = None
_PAD_MULTIPLE = _STAGES = None


def define_flags() -> None:
    """Defines the command's flags (absl allows each name once per process)."""
    global _CONFIG, _HEIGHT, _WIDTH, _BATCH, _MODE, _STEPS, _WARMUP  # pylint: disable=global-statement
    global _NUM_CLASSES, _INSTANCES, _TV_PYTHON, _TV_THREADS, _APPEND  # pylint: disable=global-statement
    global _PEAK_FLOPS, _PAD_MULTIPLE, _TV_AUTOCAST, _STAGES  # pylint: disable=global-statement
    _CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.',
                                              lock_config=False)
    _HEIGHT = flags.DEFINE_integer('height', 800, 'Image height (valid pixels).')
    _WIDTH = flags.DEFINE_integer('width', 1216, 'Image width (valid pixels).')
    _BATCH = flags.DEFINE_integer('batch', 1, 'Images per step.')
    _MODE = flags.DEFINE_enum('mode', 'both', ['inference', 'train', 'both'], 'What to time.')
    _STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps (median reported).')
    _WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
    _NUM_CLASSES = flags.DEFINE_integer('num_classes', 80, 'Foreground classes.')
    _INSTANCES = flags.DEFINE_integer('instances', 3, 'Ground-truth instances per training image.')
    _TV_PYTHON = flags.DEFINE_string('torchvision_python', None,
                                     'Python with torch + torchvision; none: skip torchvision.')
    _TV_THREADS = flags.DEFINE_integer('torchvision_threads', None,
                                       'torch.set_num_threads for torchvision (default: all cores).')
    _TV_AUTOCAST = flags.DEFINE_enum(
        'torchvision_autocast', None, ['none', 'bfloat16', 'float16'],
        "torchvision's torch.autocast dtype; default: the config's dtype when it is 16-bit "
        '(mixed precision on both sides), none for float32.')
    _APPEND = flags.DEFINE_string('append', None, 'Markdown file to append the table to.')
    _PEAK_FLOPS = flags.DEFINE_float('peak_flops', None,
                                     'Machine peak FLOP/s; default: measured matmul rate in the '
                                     "config's dtype.")
    _PAD_MULTIPLE = flags.DEFINE_integer('pad_multiple', None,
                                         'Pad H, W up to this multiple (default: largest FPN stride).')
    _STAGES = flags.DEFINE_bool('stages', True,
                                'Count FLOPs and time by stage on both sides (extra untimed steps '
                                'after the timed ones).')


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    up = lambda x: -(-x // multiple) * multiple  # noqa: E731
    return up(height), up(width)


def synthetic_batch(config, batch: int, height: int, width: int, padded: tuple[int, int],
                    instances: int, num_classes: int, seed: int = 0) -> dict:
    """Random images with `instances` valid boxes per image (masks fill their box)."""
    rng = np.random.default_rng(seed)
    d = config.dataset_configs
    m, s = d.get('max_instances', 100), d.get('gt_mask_size', 28)
    ph, pw = padded
    image = np.zeros((batch, ph, pw, 3), np.float32)
    image[:, :height, :width] = rng.standard_normal((batch, height, width, 3))
    boxes = np.zeros((batch, m, 4), np.float32)
    k = min(instances, m)
    for b in range(batch):
        for i in range(k):
            x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
            boxes[b, i] = [x0, y0, x0 + width // 4 + 8 * i, y0 + height // 4 + 8 * i]
    valid = np.zeros((batch, m), bool)
    valid[:, :k] = True
    return {'image': image,
            'image_size': np.tile(np.asarray([height, width], np.int32), (batch, 1)),
            'gt_boxes': boxes,
            'gt_classes': rng.integers(1, num_classes + 1, (batch, m)).astype(np.int32),
            'gt_valid': valid, 'gt_has_mask': valid.copy(),
            'gt_masks': np.where(valid[..., None, None], 1.0, 0.0).astype(np.float32)
            * np.ones((1, 1, s, s), np.float32)}


# ----------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------

def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or 'flops' not in cost:
        return None
    return float(cost['flops'])


def _lower_with_xla_convolutions(fn, *args):
    """`fn` (a function, not yet jitted) lowered with XLA's own convolutions."""
    with onednn.portable():   # traced anew: jit caches traces by function
        return jax.jit(lambda *a: fn(*a)).lower(*args)


def _xla_flops(fn, compiled, *args) -> float | None:
    """The step's FLOPs as XLA counts them. Where convolutions run as oneDNN custom
    calls, which XLA's cost analysis cannot see, `fn` (a function, not yet jitted)
    is lowered once more with XLA's own convolutions and that program is counted.
    XLA counts a loop's body once; the convolutions and dots of its other
    iterations (e.g. `backbone.global_attention_chunks`) are added."""
    text = compiled.as_text()
    if 'detectax_onednn' not in text:
        flops = _flops(compiled)
    else:
        try:
            lowered = _lower_with_xla_convolutions(fn, *args)
            cost = lowered.cost_analysis()
        except Exception:  # noqa: BLE001 - some backends have none
            return None
        flops = float(cost['flops']) if cost and 'flops' in cost else None
        text = lowered.as_text(dialect='hlo')
    return None if flops is None else flops + stage_flops.loop_flops_uncounted(text)


def _stages(fn, step, compiled, *args) -> dict:
    """The step's convolution and dot FLOPs by stage (its program lowered with XLA's
    convolutions, as `_xla_flops` counts it) and its thunk time by stage in one
    more, untimed and profiled, run of `step` (benchmarks/stage_flops.py)."""
    flops, _ = stage_flops.lowered_stage_flops(_lower_with_xla_convolutions(fn, *args))
    return {'flops': flops, 'time_s': stage_flops.stage_times(step, compiled.as_text())}


def _compile(fn, *args) -> tuple[object, float]:
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get('peak_bytes_in_use')


def measured_matmul_flops(dtype: str = 'float32', n: int = 2048, reps: int = 5) -> float:
    """Best n x n x n matmul rate of this backend (FLOP/s), the CPU stand-in for peak.

    16-bit operands are multiplied with float32 sums, as the kernels.matmul primitive
    does (on CPUs with bfloat16 matrix units, several times the float32 rate), so
    that a 16-bit step's achieved fraction is of the rate its matmuls can reach.
    """
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    f(x).block_until_ready()
    best = float('inf')
    for _ in range(reps):
        start = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def build_state(config, meta):
    model = MaskRCNNModel(config, meta)
    variables = step_lib.init_variables(model, jax.random.PRNGKey(config.get('rng_seed', 0)), meta)
    params = variables.pop('params')
    tx, _ = optim.build_optimizer(config, params)
    state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                               model_state=dict(variables), rng=jax.random.PRNGKey(1))
    return model, tx, state


def _timed_steps(step, steps: int, warmup: int, turn=None) -> tuple[list[float], float]:
    """Times `steps` runs of `step` after `warmup`: the times and page faults per step.
    `turn(timed)`, if given, runs after each step (the other side's, see turns.py)."""
    times, faults = [], 0
    for i in range(warmup + steps):
        seconds, step_faults = turns.timed_run(step)
        if i >= warmup:
            times.append(seconds)
            faults += step_faults
        if turn:
            turn(i >= warmup)
    return times, faults / steps


def time_inference(model, state, batch, steps: int, warmup: int, turn=None,
                   stages: bool = False) -> dict:
    """Inference latency (see `_timed_steps` for `turn`); with `stages`, the
    work and time by stage after the timed steps (`_stages`)."""
    images = {k: batch[k] for k in ('image', 'image_size')}
    step_fn = functools.partial(step_lib.eval_step, model=model)
    compiled, compile_s = _compile(jax.jit(step_fn), state, images)
    flops = _xla_flops(step_fn, compiled, state, images)
    step = lambda: jax.block_until_ready(compiled(state, images))  # noqa: E731
    times, faults = _timed_steps(step, steps, warmup, turn)
    return {'compile_s': compile_s, 'flops': flops,
            **turns.step_stats('inference', batch['image'].shape[0], times, faults),
            **({'stages': _stages(step_fn, step, compiled, state, images)} if stages else {})}


def time_train(model, tx, state, batch, steps: int, warmup: int, turn=None,
               stages: bool = False) -> dict:
    """Training step time (see `_timed_steps` for `turn`); the state is donated each
    step. With `stages`, the work and time by stage after the timed steps."""
    step_fn = functools.partial(step_lib.train_step, model=model, tx=tx)
    compiled, compile_s = _compile(jax.jit(step_fn, donate_argnums=(0,)), state, batch)
    flops = _xla_flops(step_fn, compiled, state, batch)
    metrics = None

    def step():
        nonlocal state, metrics
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    times, faults = _timed_steps(step, steps, warmup, turn)
    result = {'compile_s': compile_s, 'flops': flops,
              'total_loss': float(metrics['total_loss']),
              **turns.step_stats('train', batch['image'].shape[0], times, faults)}
    if stages:
        result['stages'] = _stages(step_fn, step, compiled, state, batch)
    return result


def detectax_rois(config, batch: int) -> dict[str, dict[str, int]]:
    """RoIs the box and mask heads see per step, fixed by the config's static shapes."""
    m = config.model
    return {'train': {'box_head': batch * m.roi_heads.batch_size_per_image,
                      'mask_head': batch * m.mask_head.num_fg_slots},
            'inference': {'box_head': batch * m.rpn.post_nms_topk_test,
                          'mask_head': batch * m.test.detections_per_image}}


def torchvision_autocast(config, requested: str | None) -> str:
    """torch.autocast dtype for the torchvision run: as asked, else the config's 16-bit dtype."""
    if requested:
        return requested
    dtype = config.get('dtype', 'float32')
    return dtype if dtype in ('bfloat16', 'float16') else 'none'


def torchvision_command(python: str, config, height: int, width: int, batch: int, mode: str,
                        num_classes: int, instances: int, threads: int | None = None,
                        autocast: str = 'none') -> list[str]:
    """The torchvision child's command line, serving one step per request (turns.py)."""
    rpn, roi = config.model.rpn, config.model.roi_heads
    # The learning rate of the config's first step, which Detectax's timed steps run at
    # (inside the warm-up): at the full rate torchvision's random-weight model diverged
    # within three steps and its heads then saw 6 RoIs instead of 1024.
    lr = float(optim.learning_rate_schedule(config.lr_configs)(0))
    return [python, '-m', 'benchmarks.torchvision_child', '--serve', f'--height={height}',
            f'--lr={lr!r}',
            f'--width={width}', f'--batch={batch}', f'--mode={mode}',
            f'--num_classes={num_classes}', f'--instances={instances}',
            f'--pre_nms_train={rpn.pre_nms_topk_train}',
            f'--post_nms_train={rpn.post_nms_topk_train}',
            f'--pre_nms_test={rpn.pre_nms_topk_test}', f'--post_nms_test={rpn.post_nms_topk_test}',
            f'--rois_per_image={roi.batch_size_per_image}',
            f'--threads={threads or os.cpu_count()}', f'--autocast={autocast}',
            f"--device={'cuda' if jax.default_backend() == 'gpu' else 'cpu'}"]


def torchvision_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    # The child's allocator keeps freed memory as this process's does (kernels/host_memory.py).
    if tunables := host_memory.glibc_tunables():
        env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES'), tunables]))
    return env


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return '-'
    if isinstance(x, str):
        return x
    return f'{x:.{digits}g}'


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = jax.devices()[0]
    return (f'{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; '
            f'JAX {jax.__version__} on {device.platform} ({device.device_kind})')


def table_rows(dx: dict, tv: dict | None, peak_flops: float) -> list[tuple[str, str, str, str]]:
    """(measure, Detectax, torchvision, Detectax speed-up) rows."""
    tv = tv or {}
    rows = []

    def speed(name, key, unit_time, section):
        d, t = dx.get(section, {}).get(key), tv.get(section, {}).get(key)
        ratio = None
        if d and t:
            ratio = t / d if unit_time else d / t
        rows.append((name, _fmt(d), _fmt(t), _fmt(ratio) + ('x' if ratio else '')))

    for section, time_key, label in (('inference', 'latency_s', 'inference latency (s/batch)'),
                                     ('train', 'step_s', 'training step (s)')):
        if section not in dx:
            continue
        speed(label, time_key, True, section)
        speed(f'{section} images/s', 'images_per_s', False, section)
        # Taken in turns, each torchvision step follows a Detectax step: the ratio of
        # each pair cancels most of the machine's drift.
        d_times, t_times = dx[section].get('times_s'), tv.get(section, {}).get('times_s')
        if d_times and t_times and len(d_times) == len(t_times):
            pairs = sorted(t / d for d, t in zip(d_times, t_times))
            rows.append((f'{section} speed-up per turn: median (range)', '', '',
                         f'{statistics.median(pairs):.3g}x ({pairs[0]:.3g}-{pairs[-1]:.3g})'))
        d = dx[section]
        rows.append((f'{section} compile (s)', _fmt(d['compile_s']), '-', ''))
        flops = d.get('flops')
        rows.append((f'{section} GFLOP per step (XLA)', _fmt(flops and flops / 1e9), '-', ''))
        achieved = flops and flops / d[time_key]
        frac = achieved and f'{_fmt(achieved / 1e9)} ({100 * achieved / peak_flops:.0f}% of peak)'
        rows.append((f'{section} achieved GFLOP/s', _fmt(frac), '-', ''))
        rows.append((f'{section} host page faults per step', _fmt(d.get('page_faults_per_step')),
                     _fmt(tv.get(section, {}).get('page_faults_per_step')), ''))
        rows += stage_flops.table_rows(section, d.get('stages'),
                                      tv.get('stages', {}).get(section), _fmt)
    rows.append(('peak host RSS (MB)', _fmt(dx['peak_rss_mb'], 4),
                 _fmt(tv.get('peak_rss_mb'), 4), ''))
    dev = dx.get('device_peak_bytes')
    tv_dev = tv.get('device_peak_bytes')
    rows.append(('peak device memory (MB)', _fmt(dev and dev / 2 ** 20, 4),
                 _fmt(tv_dev and tv_dev / 2 ** 20, 4), ''))
    return rows


def render(rows, header: str) -> str:
    lines = [header, '', '| measure | Detectax | torchvision | Detectax speed-up |',
             '|---|---|---|---|']
    lines += [f'| {" | ".join(r)} |' for r in rows]
    return '\n'.join(lines) + '\n'


def main(argv, host_memory_note: str = ''):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError('--config is required')
    stride = 2 ** (len(config.model.anchors.sizes) + 1)
    height, width = _HEIGHT.value, _WIDTH.value
    padded = padded_size(height, width, _PAD_MULTIPLE.value or stride)
    config.dataset_configs.image_size = padded
    meta = {'num_classes': _NUM_CLASSES.value, 'input_shape': (-1, *padded, 3),
            'max_instances': config.dataset_configs.get('max_instances', 100),
            'gt_mask_size': config.dataset_configs.get('gt_mask_size', 28)}
    batch = synthetic_batch(config, _BATCH.value, height, width, padded, _INSTANCES.value,
                            _NUM_CLASSES.value)
    model, tx, state = build_state(config, meta)
    mode = _MODE.value
    tv_client = None
    if _TV_PYTHON.value:
        tv_client = turns.Client(
            torchvision_command(_TV_PYTHON.value, config, height, width, _BATCH.value, mode,
                                _NUM_CLASSES.value, _INSTANCES.value, _TV_THREADS.value,
                                torchvision_autocast(config, _TV_AUTOCAST.value)),
            env=torchvision_env(), cwd=_REPO)

    def turn(section):   # torchvision's step, run after each of Detectax's
        return functools.partial(tv_client.step, section) if tv_client else None

    dx, tv = {}, None
    try:
        if mode in ('inference', 'both'):
            dx['inference'] = time_inference(model, state, batch, _STEPS.value, _WARMUP.value,
                                             turn('inference'), _STAGES.value)
        if mode in ('train', 'both'):
            dx['train'] = time_train(model, tx, state, batch, _STEPS.value, _WARMUP.value,
                                     turn('train'), _STAGES.value)
        for section, rois in detectax_rois(config, _BATCH.value).items():
            if 'stages' in dx.get(section, {}):
                dx[section]['stages']['rois'] = rois
        if tv_client:
            tv = tv_client.finish()
    finally:
        if tv_client:
            tv_client.close()
    dx['peak_rss_mb'] = peak_rss_mb()
    dx['device_peak_bytes'] = _device_peak_bytes()
    del state

    peak = _PEAK_FLOPS.value
    peak_note = 'given by --peak_flops'
    if not peak:
        dtype = config.get('dtype', 'float32')
        peak = measured_matmul_flops(dtype)
        peak_note = (f'measured {dtype} 2048x2048 matmul rate'
                     f'{"" if dtype == "float32" else " with float32 sums"} in this run')

    command = 'python -m benchmarks.benchmark ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
    tv_versions = (f"torch {tv['torch']}, torchvision {tv['torchvision']} on {tv['device']} "
                   f"({tv['threads']} threads, autocast {tv['autocast']})"
                   if tv else 'torchvision not run')
    header = '\n'.join([
        f'### {config.get("experiment_name", "config")}: {height}x{width} '
        f'(padded {padded[0]}x{padded[1]}), batch {_BATCH.value}, {mode}, '
        f'{config.get("dtype", "float32")}',
        '',
        f'`{command}`',
        '',
        f'{datetime.date.today().isoformat()}; {machine_description()}; {tv_versions}. '
        f'Median of {_STEPS.value} steps after {_WARMUP.value} warm-up'
        f'{", the two sides taking turns step by step" if tv else ""}; peak '
        f'{peak / 1e9:.0f} GFLOP/s ({peak_note}); host memory: {host_memory_note}; '
        f'{onednn.describe(config.get("dtype", "float32"))}. '
        'Detectax per-step times (s): '
        + '; '.join(f"{k} {', '.join(f'{t:.3g}' for t in dx[k]['times_s'])}"
                    for k in ('inference', 'train') if k in dx)
        + ('; torchvision: ' + '; '.join(
            f"{k} {', '.join(f'{t:.3g}' for t in tv[k]['times_s'])}"
            for k in ('inference', 'train') if k in tv) if tv else '') + '.'])
    text = render(table_rows(dx, tv, peak), header)
    print(text)
    print(json.dumps({'detectax': dx, 'torchvision': tv, 'peak_flops': peak}))
    if _APPEND.value:
        with open(_APPEND.value, 'a') as f:
            f.write('\n' + text)


if __name__ == '__main__':
    # Before JAX starts its backend (kernels/host_memory.py); the torchvision child gets the same.
    _note = host_memory.keep_freed_memory()
    define_flags()
    app.run(functools.partial(main, host_memory_note=_note))
