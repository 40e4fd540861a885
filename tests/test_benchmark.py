"""benchmarks/benchmark.py: the command runs on the tiny config and reports
positive, consistent figures; the table's ratios and padding are right."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import benchmark, stage_flops, turns
from projects.maskrcnn.kernels import onednn
from tests import tiny_shapes_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('| ') and len(cells) == 4 and not cells[0].startswith('---'):
            rows[cells[0]] = cells[1:]
    return rows


# A stand-in for torchvision's interpreter: whatever the arguments, it serves
# steps that sleep (the real serve loop of benchmarks/turns.py).
_FAKE_TORCHVISION = """
import time
from benchmarks import turns
stages = {'inference': {'flops': {'body': {'forward': 3e9}, 'mask_head': {'forward': 5e9}},
                        'time_s': {'forward': {'body': 0.25}, 'phases': {'forward': 0.5}}}}
turns.serve({'inference': lambda: time.sleep(0.02), 'train': lambda: time.sleep(0.02)},
            batch=2, summary=lambda: {'torch': 'fake', 'torchvision': 'fake', 'device': 'cpu',
                                      'threads': 1, 'autocast': 'none', 'peak_rss_mb': 1.0,
                                      'stages': stages})
"""


def test_command_on_tiny_config_reports_positive_consistent_figures(tmp_path):
    out_md = tmp_path / 'bench.md'
    fake_python = tmp_path / 'python'
    fake_python.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{_FAKE_TORCHVISION}"\n')
    fake_python.chmod(0o755)
    cmd = [sys.executable, '-m', 'benchmarks.benchmark', '--config=tests/tiny_shapes_config.py',
           '--height=64', '--width=64', '--batch=2', '--mode=inference', '--steps=2',
           '--peak_flops=1e11', f'--append={out_md}', f'--torchvision_python={fake_python}']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out_md.read_text()
    assert 'python -m benchmarks.benchmark --config=tests/tiny_shapes_config.py' in text
    assert 'cores' in text and 'JAX' in text and '64x64 (padded 64x64), batch 2' in text
    rows = _table(text)
    for name in ('inference latency (s/batch)', 'inference images/s', 'inference compile (s)',
                 'inference GFLOP per step (XLA)', 'peak host RSS (MB)'):
        assert float(rows[name][0]) > 0, (name, rows[name])
    assert re.fullmatch(r'[0-9.e+-]+ \([0-9]+% of peak\)', rows['inference achieved GFLOP/s'][0])
    # Two images per step: images/s is twice the inverse latency.
    latency, per_s = float(rows['inference latency (s/batch)'][0]), float(
        rows['inference images/s'][0])
    np.testing.assert_allclose(latency * per_s, 2.0, rtol=0.01)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The stand-in's two timed steps, taken in turns with ours, give the ratio column.
    assert 'the two sides taking turns step by step' in text
    tv_latency = result['torchvision']['inference']['latency_s']
    assert tv_latency >= 0.02 and rows['inference latency (s/batch)'][1] == f'{tv_latency:.3g}'
    ratio = tv_latency / result['detectax']['inference']['latency_s']
    assert rows['inference latency (s/batch)'][2] == f'{ratio:.3g}x'
    pairs = sorted(t / d for d, t in zip(result['detectax']['inference']['times_s'],
                                         result['torchvision']['inference']['times_s']))
    assert rows['inference speed-up per turn: median (range)'][2] == (
        f'{np.median(pairs):.3g}x ({pairs[0]:.3g}-{pairs[-1]:.3g})')
    assert 'training step (s)' not in rows
    # The allocator keeps freed memory (host_memory.py): the header says so, and the
    # table counts each side's page faults per step.
    assert 'host memory: freed memory kept' in text or 'not glibc' in text
    assert float(rows['inference host page faults per step'][0]) >= 0
    assert result['peak_flops'] == 1e11
    assert len(result['torchvision']['inference']['times_s']) == 2
    assert 'train' not in result['torchvision']
    assert len(result['detectax']['inference']['times_s']) == 2
    assert result['detectax']['inference']['flops'] > 1e6
    _assert_stage_rows(rows, result)


def _assert_stage_rows(rows, result):
    """The per-stage rows: Detectax's positive where the tiny model has the stage,
    summing to its total; the stand-in torchvision's summary in its column."""
    total = float(rows['inference GFLOP per step (XLA)'][0])
    stages = [float(rows[f'inference {s} forward GFLOP'][0]) for s in stage_flops.STAGES]
    for stage in ('body', 'fpn', 'rpn', 'box_head', 'mask_head'):
        assert float(rows[f'inference {stage} forward GFLOP'][0]) > 0, stage
        assert float(rows[f'inference {stage} forward time (ms)'][0]) > 0, stage
    assert float(rows['inference all forward GFLOP'][0]) == pytest.approx(sum(stages), rel=0.01)
    # Convolutions and dots: XLA's total less its elementwise work (a tenth of this model's).
    assert 0.8 * total <= sum(stages) <= total * 1.001, (stages, total)
    flops = result['detectax']['inference']['stages']['flops']
    assert sum(v['forward'] for v in flops.values()) == pytest.approx(
        1e9 * sum(stages), rel=0.01)
    assert rows['inference body forward GFLOP'][1] == '3'
    assert rows['inference mask_head forward GFLOP'][1] == '5'
    assert rows['inference body forward time (ms)'][1] == '250'
    # The ratio is of the unrounded times (the cells show three figures).
    d_body = result['detectax']['inference']['stages']['time_s']['body']['forward']
    assert float(rows['inference body forward time (ms)'][0]) == pytest.approx(
        1e3 * d_body, rel=5e-3)
    assert rows['inference body forward time (ms)'][2] == f'{0.25 / d_body:.3g}x'
    assert rows['inference fpn forward GFLOP'][1] == '-'   # the stand-in has no such stage
    config = tiny_shapes_config.get_config()
    assert result['detectax']['inference']['stages']['rois'] == {
        'box_head': 2 * config.model.rpn.post_nms_topk_test,
        'mask_head': 2 * config.model.test.detections_per_image}


def test_peak_is_measured_in_the_configs_dtype():
    # bfloat16 operands with float32 sums: the rate the 16-bit step's matmuls run at.
    for dtype in ('float32', 'bfloat16'):
        assert benchmark.measured_matmul_flops(dtype, n=128, reps=1) > 0
    with pytest.raises(TypeError):
        benchmark.measured_matmul_flops('not-a-dtype', n=8, reps=1)


def test_speed_up_column_divides_the_right_way():
    dx = {'inference': {'latency_s': 1.0, 'images_per_s': 1.0, 'compile_s': 5.0, 'flops': 2e9},
          'train': {'step_s': 4.0, 'images_per_s': 0.5, 'compile_s': 9.0, 'flops': None},
          'peak_rss_mb': 100.0, 'device_peak_bytes': None}
    tv = {'inference': {'latency_s': 3.0, 'images_per_s': 1 / 3, 'page_faults_per_step': 7.0},
          'train': {'step_s': 2.0, 'images_per_s': 1.0}, 'peak_rss_mb': 50.0}
    rows = {r[0]: r[1:] for r in benchmark.table_rows(dx, tv, peak_flops=4e9)}
    assert rows['inference latency (s/batch)'] == ('1', '3', '3x')
    assert rows['inference images/s'][2] == '3x'
    assert rows['training step (s)'] == ('4', '2', '0.5x')   # Detectax slower
    assert rows['train images/s'][2] == '0.5x'
    assert rows['inference achieved GFLOP/s'][0] == '2 (50% of peak)'
    assert rows['train GFLOP per step (XLA)'][0] == '-'
    assert rows['peak device memory (MB)'][0] == '-'
    assert rows['inference host page faults per step'] == ('-', '7', '')


def test_padding_and_synthetic_batch():
    assert benchmark.padded_size(800, 1216, 64) == (832, 1216)
    assert benchmark.padded_size(512, 512, 64) == (512, 512)
    config = tiny_shapes_config.get_config()
    batch = benchmark.synthetic_batch(config, 2, 60, 50, (64, 64), instances=3, num_classes=5)
    m = config.dataset_configs.max_instances
    assert batch['image'].shape == (2, 64, 64, 3)
    assert not batch['image'][:, 60:].any() and not batch['image'][:, :, 50:].any()
    assert batch['gt_valid'].sum(1).tolist() == [3, 3] and batch['gt_boxes'].shape == (2, m, 4)
    boxes = batch['gt_boxes'][batch['gt_valid']]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (batch['gt_classes'] >= 1).all() and (batch['gt_classes'] <= 5).all()
    assert batch['gt_masks'][batch['gt_valid']].min() == 1.0
    assert batch['gt_masks'][~batch['gt_valid']].max() == 0.0


ROW_NAMES = ['forward conv, XLA', 'forward conv, Detectax', 'input grad, XLA',
             'input grad, Detectax', 'kernel grad, XLA', 'kernel grad, Detectax']
# With the oneDNN kernels (tests/kernels/test_onednn.py requires them on Linux x86-64).
ONEDNN_ROWS = ['forward conv, oneDNN', 'input grad, oneDNN', 'kernel grad, oneDNN']


@pytest.mark.parametrize('dtype,kernel,stride', [('float32', 3, 2), ('float32', 1, 1),
                                                 ('bfloat16', 3, 1)])
def test_conv_grad_microbenchmark_times_both_lowerings(dtype, kernel, stride):
    cmd = [sys.executable, '-m', 'benchmarks.conv_grad_microbenchmark', '--shape=1,9,7,16',
           '--features=8', f'--kernel={kernel}', f'--stride={stride}', '--reps=1',
           f'--dtype={dtype}']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r'^((?:forward conv|input grad|kernel grad), [a-zA-Z ]+?)\s+([0-9.]+) ms',
                      proc.stdout, re.M)
    with_onednn = onednn.status().available
    assert [r[0] for r in rows] == ROW_NAMES + (ONEDNN_ROWS if with_onednn else []), proc.stdout
    assert sum(float(r[1]) for r in rows) > 0, proc.stdout  # single rows may print 0.0 ms
    # The kernel gradients agree with XLA's (the command asserts it too and prints them).
    errs = re.search(r"kernel gradients from XLA's: Detectax ([0-9.e+-]+)(?:, oneDNN ([0-9.e+-]+))?",
                     proc.stdout)
    assert (errs.group(2) is not None) == with_onednn, proc.stdout
    for err in filter(None, errs.groups()):
        assert float(err) < (1e-4 if dtype == 'float32' else 2 ** -6)


def test_roi_align_benchmark_times_both_forms_and_says_which_auto_picks():
    cmd = [sys.executable, '-m', 'benchmarks.roi_align_benchmark', '--image=64,64', '--batch=2',
           '--boxes=5', '--channels=4', '--output_size=3', '--reps=1']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]   # the command asserts the forms agree
    rows = {m[0]: (float(m[1]), float(m[2]))
                for m in re.findall(r'^(gather|matmul)\s+([0-9.]+)\s+([0-9.]+)$', proc.stdout, re.M)}
    assert set(rows) == {'gather', 'matmul'} and all(min(v) > 0 for v in rows.values()), proc.stdout
    assert re.search(r'auto picks (gather|matmul)$', proc.stdout, re.M), proc.stdout


def test_torchvision_runs_in_the_configs_mixed_precision():
    config = tiny_shapes_config.get_config()
    assert benchmark.torchvision_autocast(config, None) == 'none'   # float32 against float32
    config.dtype = 'bfloat16'
    assert benchmark.torchvision_autocast(config, None) == 'bfloat16'
    assert benchmark.torchvision_autocast(config, 'none') == 'none'  # the flag wins
    cmd = benchmark.torchvision_command('py', config, 64, 48, 2, 'train', 5, 3,
                                        autocast='bfloat16')
    assert cmd[:4] == ['py', '-m', 'benchmarks.torchvision_child', '--serve']
    assert '--autocast=bfloat16' in cmd and '--device=cpu' in cmd and '--height=64' in cmd
    assert f'--post_nms_train={config.model.rpn.post_nms_topk_train}' in cmd


# A stand-in for the torchvision child: the real serve loop with a step that sleeps.
_FAKE_CHILD = """
import sys, time
from benchmarks import turns
turns.serve({'train': lambda: time.sleep(float(sys.argv[1]))}, batch=2,
            summary=lambda: {'torch': 'fake'})
"""


def test_turns_time_the_childs_steps_between_ours_and_summarise_the_timed_ones():
    client = turns.Client([sys.executable, '-c', _FAKE_CHILD, '0.05'], cwd=REPO)
    try:
        assert client.step('train', False) >= 0.05      # a warm-up step: not in the summary
        assert all(client.step('train', True) >= 0.05 for _ in range(3))
        with pytest.raises(RuntimeError, match="bad request 'inference 1'"):
            client.step('inference', True)              # a mode the child does not serve
        result = client.finish()
    finally:
        client.close()
    assert result['torch'] == 'fake' and 'inference' not in result
    train = result['train']
    assert len(train['times_s']) == 3 and min(train['times_s']) >= 0.05
    assert train['step_s'] == sorted(train['times_s'])[1]
    assert train['images_per_s'] == pytest.approx(2 / train['step_s'])
    assert train['page_faults_per_step'] >= 0


def test_turns_report_a_child_that_dies_with_its_stderr():
    client = turns.Client([sys.executable, '-c', _FAKE_CHILD, 'not-a-number'], cwd=REPO)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)exited \(1\).*could not convert string"):
            client.step('train', True)
        with pytest.raises(RuntimeError, match=r'exited \(1\)'):   # not a BrokenPipeError
            client.step('train', True)
    finally:
        client.close()


def test_stage_rows_give_torchvisions_backward_as_one_total():
    dx = {'flops': {'body': {'forward': 2e9, 'backward': 4e9}, 'rpn': {'forward': 1e9,
                                                                       'backward': 1e9}},
          'time_s': {'body': {'forward': 0.1, 'backward': 0.2}, 'rpn': {'forward': 0.05,
                                                                        'backward': 0.1}}}
    tv = {'flops': {'body': {'forward': 2e9}, 'all': {'forward': 3e9, 'backward': 6e9}},
          'time_s': {'forward': {'body': 0.2}, 'phases': {'forward': 0.3, 'backward': 0.6}},
          'rois': {'box_head': 1024, 'mask_head': 6}, 'rois_timed': {'box_head': 6,
                                                                      'mask_head': 6}}
    dx['rois'] = {'box_head': 1024, 'mask_head': 16}
    rows = {r[0]: r[1:] for r in stage_flops.table_rows('train', dx, tv, benchmark._fmt)}
    assert rows['train body forward GFLOP'] == ('2', '2', '')
    assert rows['train body forward time (ms)'] == ('100', '200', '2x')
    assert rows['train body backward GFLOP'] == ('4', '-', '')
    assert rows['train all backward GFLOP'] == ('5', '6', '')
    assert rows['train all backward time (ms)'] == ('300', '600', '2x')
    assert rows['train all forward GFLOP'] == ('3', '3', '')
    assert stage_flops.table_rows('train', None, None, benchmark._fmt) == []
    assert rows['train box_head RoIs'] == ('1.02e+03', '1.02e+03 (6 after the timed steps)', '')
    assert rows['train mask_head RoIs'] == ('16', '6', '')
    assert 'inference body backward GFLOP' not in {
        r[0] for r in stage_flops.table_rows('inference', dx, tv, benchmark._fmt)}


def test_torchvision_device_memory_is_reported():
    dx = {'peak_rss_mb': 100.0, 'device_peak_bytes': 3 * 2 ** 20}
    tv = {'peak_rss_mb': 50.0, 'device_peak_bytes': 5 * 2 ** 20}
    rows = {r[0]: r[1:] for r in benchmark.table_rows(dx, tv, peak_flops=1e9)}
    assert rows['peak device memory (MB)'] == ('3', '5', '')


def test_matmul_microbenchmark_times_the_three_arithmetics():
    cmd = [sys.executable, '-m', 'benchmarks.matmul_microbenchmark', '--shapes=64x48x32',
           '--reps=1']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # it asserts the =auto row's accuracy
    rows = re.findall(r'^\s*64x48x32 (float32|bfloat16, XLA \(=xla\)|bfloat16, float32 sums '
                      r'\(=auto\))\s+([0-9.]+) ms .* ([0-9.]+) ms .* ([0-9.e+-]+)$',
                      proc.stdout, re.M)
    assert [r[0] for r in rows] == ['float32', 'bfloat16, XLA (=xla)',
                                    'bfloat16, float32 sums (=auto)'], proc.stdout
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    assert float(rows[0][3]) == 0.0 and 0 < float(rows[2][3]) < 2 ** -7


def test_ab_train_step_forwards_the_step_flags_and_names_a_bad_tree(tmp_path):
    from benchmarks import ab_train_step
    argv = ['--a=/x', '--b=.', '--config=tests/tiny_shapes_config.py',
            '--config.dtype=bfloat16', '--height=64', '--width', '--rounds=3',
            '--steps_per_round=1', '--batch=2']
    assert ab_train_step.step_flags(argv) == [
        '--config=tests/tiny_shapes_config.py', '--config.dtype=bfloat16', '--height=64',
        '--width', '--batch=2']
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.ab_train_step', f'--a={tmp_path}', '--b=.',
         '--config=tests/tiny_shapes_config.py'],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert f'--a={tmp_path}: no projects/maskrcnn there' in proc.stderr + proc.stdout


def test_ab_train_step_sets_each_sides_environment_and_names_a_bad_setting():
    from absl import app
    from benchmarks import ab_train_step
    base = {'PATH': '/bin', 'DETECTAX_CPU_KERNELS': 'auto'}
    env = ab_train_step.side_env(base, ['DETECTAX_CPU_KERNELS=matmul', 'X=a=b'], 'env_a')
    assert env == {'PATH': '/bin', 'DETECTAX_CPU_KERNELS': 'matmul', 'X': 'a=b'}
    assert base['DETECTAX_CPU_KERNELS'] == 'auto'   # the other side's environment is untouched
    with pytest.raises(app.UsageError, match="--env_b: 'DETECTAX_CPU_KERNELS' is not NAME=value"):
        ab_train_step.side_env(base, ['DETECTAX_CPU_KERNELS'], 'env_b')


@pytest.mark.skipif(not onednn.status().available, reason=onednn.status().reason)
def test_flops_count_the_convolutions_that_run_as_custom_calls():
    import jax
    import jax.numpy as jnp
    from projects.maskrcnn import kernels
    x, kernel = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 64))

    def step(x, kernel):
        return kernels.conv(x, kernel, (1, 1), ((1, 1), (1, 1)))
    compiled = jax.jit(step).lower(x, kernel).compile()   # traced with oneDNN first
    assert 'detectax_onednn_conv_forward' in compiled.as_text()
    assert benchmark._flops(compiled) < 1e6   # XLA sees no work in the custom call
    # XLA counts the taps that fall inside the map: (16 * 3 - 2)^2 per image and channel pair.
    assert benchmark._xla_flops(step, compiled, x, kernel) == 2 * 2 * 46 * 46 * 32 * 64

