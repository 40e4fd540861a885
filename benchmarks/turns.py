"""Steps of two processes timed in turns: a child serves one step per request.

A benchmark that times its own steps and then another process's sees the
machine at two different moments; on a shared machine the load drifts by
20-30% between them. Here the other process (benchmarks/torchvision_child.py
with --serve) stays alive and runs one step each time the benchmark asks,
between the benchmark's own steps, so both sides' medians come from the same
stretch of time.

The protocol is one line each way: the child prints `ready`; the parent writes
`<mode> <timed>` (timed 0 for a warm-up step), the child runs one step of that
mode and answers `{"s": seconds}` (or `{"error": ...}`); on `exit` or end of
input the child prints one JSON line with what `summary()` returns and, per
mode, the timed steps' median, images/s, times and minor page faults per step.

Standard library only: the torchvision child runs in a venv without JAX.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TextIO
from collections.abc import Callable

from benchmarks.memory import minor_page_faults

# The per-mode key of the median step time, as benchmark.py's tables read it.
TIME_KEYS = {'inference': 'latency_s', 'train': 'step_s'}


def step_stats(mode: str, batch: int, times: list[float], faults: float) -> dict:
    """The summary of one mode's timed steps."""
    median = statistics.median(times)
    return {TIME_KEYS[mode]: median, 'images_per_s': batch / median, 'times_s': times,
            'page_faults_per_step': faults}


def timed_run(step: Callable[[], None], sync: Callable[[], None] = lambda: None
              ) -> tuple[float, int]:
    """Runs `step` once: its wall time in seconds (after `sync`) and this process's
    minor page faults during it."""
    before = minor_page_faults()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start, minor_page_faults() - before


def serve(steps: dict[str, Callable[[], None]], batch: int, summary: Callable[[], dict],
          sync: Callable[[], None] = lambda: None, infile: TextIO = sys.stdin,
          outfile: TextIO = sys.stdout) -> None:
    """The child's side: runs one step of the mode asked for per request line."""
    times = {mode: [] for mode in steps}
    faults = dict.fromkeys(steps, 0)

    def say(obj) -> None:
        outfile.write(json.dumps(obj) + '\n')
        outfile.flush()

    say('ready')
    for line in infile:
        parts = line.split()
        if parts == ['exit']:
            break
        if len(parts) != 2 or parts[0] not in steps or parts[1] not in ('0', '1'):
            say({'error': f'bad request {line.strip()!r}; expected "<mode> 0|1" with mode '
                          f'one of {sorted(steps)}, or "exit"'})
            continue
        mode, timed = parts[0], parts[1] == '1'
        seconds, step_faults = timed_run(steps[mode], sync)
        if timed:
            times[mode].append(seconds)
            faults[mode] += step_faults
        say({'s': seconds})
    result = summary()
    for mode, ts in times.items():
        if ts:
            result[mode] = step_stats(mode, batch, ts, faults[mode] / len(ts))
    say(result)


class Client:
    """The parent's side: starts the child on the first request and asks for steps."""

    def __init__(self, cmd: list[str], env: dict | None = None, cwd: str | None = None):
        self.cmd, self.env, self.cwd = cmd, env, cwd
        self.proc = None
        self.log = None

    def _read(self):
        line = self.proc.stdout.readline()
        try:
            reply = json.loads(line) if line else None
        except json.JSONDecodeError:
            reply = None
        if reply is None:
            self.log.seek(0)
            raise RuntimeError(f'{self.cmd[:3]} exited ({self.proc.wait()}) or answered '
                               f'{line!r}:\n{self.log.read()[-3000:]}')
        if isinstance(reply, dict) and 'error' in reply:
            raise RuntimeError(f'{self.cmd[:3]}: {reply["error"]}')
        return reply

    def _write(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + '\n')
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass   # the child has exited: _read reports it, with its stderr

    def start(self) -> None:
        if self.proc is None:
            self.log = tempfile.TemporaryFile('w+')   # the child's stderr, for its errors
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.log)
            if self._read() != 'ready':
                raise RuntimeError(f'{self.cmd[:3]} did not say ready')

    def step(self, mode: str, timed: bool) -> float:
        """Runs one step of `mode` in the child; its wall time in seconds."""
        self.start()
        self._write(f'{mode} {int(timed)}')
        return self._read()['s']

    def finish(self) -> dict:
        """Ends the child; its summary (see `serve`)."""
        self.start()
        try:
            self._write('exit')
            return self._read()
        finally:
            self.close()

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass   # a request the exited child never read
            self.proc.wait()
            self.log.close()
