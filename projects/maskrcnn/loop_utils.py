"""Pieces of the training loop: preemption signal, divergence check, metric
summaries and a cross-process barrier."""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits for every process (jax.distributed's coordination service, not a
    device collective: CPU collectives give up when peers are 30 s apart)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


class StopSignal:
    """Records SIGTERM (a preemption or a scheduler's stop) so that the loop can
    save a checkpoint at the next step boundary and return cleanly."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning('Received signal %d: saving a checkpoint and stopping.', signum)
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # jax.distributed's preemption notice: all processes agree on the step.
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received


def check_finite(history: list[dict], first_step: int, manager: ocp.CheckpointManager,
                  skip_nonfinite: bool) -> None:
    """Raises at the first step of `history` whose loss is not finite, naming
    the step, the terms that went non-finite and the last good checkpoint."""
    if skip_nonfinite:
        return
    for offset, metrics in enumerate(history):
        bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
        if bad:
            last = manager.latest_step()
            where = (f'the last good checkpoint is step {last} in {manager.directory}'
                     if last is not None else 'no checkpoint was saved yet')
            raise FloatingPointError(
                f'Training diverged: non-finite {", ".join(bad)} at step {first_step + offset}; '
                f'{where}. Lower the learning rate or add '
                f'config.optimizer_configs.grad_clip_norm, or set '
                f'config.skip_nonfinite_steps=True to skip such steps and count them.')


def summarise(history: list[dict]) -> dict:
    """Mean of each metric over the finite values of the logged steps."""
    summary = {}
    for key in history[0]:
        values = np.asarray([m[key] for m in history], np.float64)
        finite = values[np.isfinite(values)]
        summary[key] = float(finite.mean()) if finite.size else float('nan')
    return summary
