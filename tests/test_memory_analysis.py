"""Tests for benchmarks/memory_analysis.py: the CPU schedule it compiles under, and
the command itself on the demo ViTDet."""

import os
import subprocess
import sys

import pytest

from benchmarks import memory_analysis
from projects.maskrcnn import runtime  # noqa: F401 - defines --config: importing both must work

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Four rematerialised blocks, each with a 4096 x 4096 float32 softmax (67 MB).
_TOY = """
import sys
import jax, jax.numpy as jnp
from benchmarks import memory_analysis
memory_analysis.set_cpu_schedule(sys.argv[1])
def block(x, w):
    return jnp.tanh(jax.nn.softmax(x @ w, axis=-1) @ x)
def loss(x, ws):
    for i in range(4):
        x = jax.checkpoint(block)(x, ws[i])
    return jnp.sum(x)
x = jax.ShapeDtypeStruct((4096, 64), jnp.float32)
ws = jax.ShapeDtypeStruct((4, 64, 4096), jnp.float32)
compiled = jax.jit(jax.grad(loss)).lower(x, ws).compile()
print(compiled.memory_analysis().temp_size_in_bytes)
"""


def _toy_temporaries(schedule: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    proc = subprocess.run([sys.executable, '-c', _TOY, schedule], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_memory_schedule_lets_rematerialisation_free_what_it_recomputes():
    # XLA:CPU's default order computes every block's backward softmax up front (all
    # held at once); the memory-minimising order holds about one at a time.
    memory, concurrency = _toy_temporaries('memory'), _toy_temporaries('concurrency')
    assert concurrency > 4 * 2 * 67e6, concurrency
    assert memory < concurrency / 2, (memory, concurrency)


def test_a_scheduler_already_in_xla_flags_is_refused(monkeypatch):
    monkeypatch.setenv('XLA_FLAGS', f'{memory_analysis.SCHEDULER_FLAG}=true')
    with pytest.raises(ValueError, match='use --cpu_schedule'):
        memory_analysis.set_cpu_schedule('memory')
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_use_thunk_runtime=true')
    memory_analysis.set_cpu_schedule('memory')
    assert os.environ['XLA_FLAGS'] == (
        f'--xla_cpu_use_thunk_runtime=true {memory_analysis.SCHEDULER_FLAG}=false')


def test_command_prints_the_step_memory_of_the_demo_vitdet():
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.memory_analysis', '--config=configs/demo_shapes_vitdet.py',
         '--height=128', '--width=128', '--batch=2', '--num_classes=3',
         '--config.model.backbone.remat=True', '--config.model.backbone.global_attention_chunks=2'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ('2 x 128x128, dtype float32, remat True, global_attention_chunks 2, cpu, '
            'memory schedule') in proc.stdout
    figures = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
               if line.endswith(' GB')}
    assert figures['arguments'] > 0 and figures['temporaries'] > 0
    assert figures['arguments_plus_temporaries'] == pytest.approx(
        figures['arguments'] + figures['temporaries'], abs=0.02)
