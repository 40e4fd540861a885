"""Timing shared by the microbenchmarks."""

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
