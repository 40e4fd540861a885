"""host_memory.keep_freed_memory: a step's freed host buffers are reused, not faulted in anew."""

import json
import subprocess
import sys
import textwrap

import pytest

from projects.maskrcnn.kernels import host_memory
from tests import run_utils

# Runs a jitted function with two 25 MB temporaries, freed after each call, and prints
# the fewest minor page faults per call over eight rounds (the heap grows for a round or
# two before it holds a step's buffers, longer when the machine is busy: four rounds once
# saw 2,400 faults a call in CI while another test ran beside it). By default glibc maps
# blocks that large with mmap and unmaps them on free, so every call faults their pages in again.
_PROBE = textwrap.dedent("""
    import json, resource
    from projects.maskrcnn.kernels import host_memory
    note = host_memory.keep_freed_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sin(x[:, None] * x[None, :]) @ jnp.cos(x[:, None] * x[None, :]))
    x = jnp.linspace(0.0, 1.0, 2500)
    f(x).block_until_ready()
    rounds = []
    for _ in range(8):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            f(x).block_until_ready()
        rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5)
    print(json.dumps({'note': note, 'faults': min(rounds)}))
""")


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True,
                         cwd=run_utils.REPO, timeout=300,
                         env=run_utils.subprocess_env(DETECTAX_HOST_MEMORY=mode))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason='the setting is for glibc')
def test_kept_memory_is_not_faulted_in_again():
    released, kept = _probe('release'), _probe('keep')
    assert 'release' in released['note'] and 'kept' in kept['note']
    # 50 MB of 4 KiB pages is about 12,000 faults a call when released.
    assert released['faults'] > 6_000, released
    assert kept['faults'] < released['faults'] / 20, (kept, released)


def test_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, 'always')
    with pytest.raises(ValueError, match="DETECTAX_HOST_MEMORY='always'"):
        host_memory.keep_freed_memory()
    with pytest.raises(ValueError, match='keep, release'):
        host_memory.glibc_tunables()


def test_release_leaves_the_allocator_and_the_child_alone(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, 'release')
    assert host_memory.glibc_tunables() == ''
    assert 'release' in host_memory.keep_freed_memory()
    monkeypatch.setenv(host_memory.ENV, 'keep')
    assert 'arena_max=1' in host_memory.glibc_tunables()
