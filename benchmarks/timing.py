"""Timing shared by the microbenchmarks."""

import os
import statistics
import time

import jax


def median_seconds(fn, *args, reps: int) -> float:
    """Median wall time of `reps` runs of `fn(*args)`, after one untimed run (compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jit_with_env(fn, **env: str):
    """jit(fn) traced with the environment variables `env` (NAME=value) set, restored after.

    For the switches of the kernels package, which are read when a function is traced.
    """
    jitted = jax.jit(lambda *args: fn(*args))   # a fresh function: jit caches traces by it

    def run(*args):
        previous = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return jitted(*args)
        finally:
            for k, v in previous.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
    return run
