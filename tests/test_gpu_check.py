"""benchmarks/gpu_check.sh runs where only JAX is installed: the accelerator machine's
image has no TensorFlow, TFDS, clu, pycocotools or imgviz, so the benchmark's whole
path (model, losses, optimizer, the jitted steps) must import none of them."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'pycocotools', 'imgviz')

# Loaded by Python at start-up from PYTHONPATH, in every process the script starts.
_SITECUSTOMIZE = f'''
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError(f'{{name}} is not on the accelerator machine (blocked in this test)')

sys.meta_path.insert(0, _Blocked())
'''


def _env(tmp_path) -> dict:
    (tmp_path / 'sitecustomize.py').write_text(_SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(PYTHONPATH=f'{tmp_path}{os.pathsep}{REPO}', JAX_PLATFORMS='cpu',
               PYTHON=sys.executable, TORCHVISION_PYTHON='', OUT=str(tmp_path / 'out'))
    return env


def test_blocker_blocks(tmp_path):
    proc = subprocess.run([sys.executable, '-c', 'import clu'], env=_env(tmp_path),
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and 'blocked in this test' in proc.stderr


def test_gpu_check_runs_tiny_without_tensorflow(tmp_path):
    env = _env(tmp_path)
    env['GPU_CHECK_TINY'] = '1'
    (tmp_path / 'out').mkdir()
    proc = subprocess.run(['bash', 'benchmarks/gpu_check.sh'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = (tmp_path / 'out' / 'gpu_benchmarks.md').read_text()
    for title in ('batch 2, train, bfloat16', 'batch 1, inference, float32'):
        assert title in report, report
    assert 'failed' not in report
    for remat in ('False', 'True'):   # the compiled memory of the ViTDet step, both ways
        section = report.split(f'### ViTDet-B training step memory, remat {remat} (exit 0)')[1]
        assert f'remat {remat}' in section.split('```')[1]
        assert float(section.split('arguments_plus_temporaries')[1].split()[0]) > 0
    for row in ('train images/s', 'train compile (s)', 'inference images/s'):
        cells = [line for line in report.splitlines() if line.startswith(f'| {row} |')]
        assert cells and float(cells[0].split('|')[2]) > 0, (row, report)
    runs = (tmp_path / 'out' / 'gpu_benchmarks.jsonl').read_text().splitlines()
    assert len(runs) >= 2
    assert 'jax' in proc.stdout and "torchvision: not available" in proc.stdout
