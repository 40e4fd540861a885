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


def jit_with_env(fn, name: str, value: str):
    """jit(fn) traced with the environment variable `name` set to `value`, restored after.

    For the lowering switches of modeling/layers.py, which are read when a function is traced.
    """
    jitted = jax.jit(lambda *args: fn(*args))   # a fresh function: jit caches traces by it

    def run(*args):
        previous = os.environ.get(name)
        os.environ[name] = value
        try:
            return jitted(*args)
        finally:
            if previous is None:
                del os.environ[name]
            else:
                os.environ[name] = previous
    return run
