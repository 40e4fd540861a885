"""One training run per workdir.

`<workdir>/.detectax_lock` names the run that holds the workdir (host, pid,
start time, command). A second run on the same workdir stops at once, naming
the holder. A lock left by a run that died (its pid no longer runs on this
host, or now belongs to another process) is taken over with a log line. In a
multi-process run only process 0 holds the file; the others learn its outcome
through jax.distributed's key-value store, so every process of a refused job
stops with the same message.

JAX is imported only where needed, so that `exit_if_busy` can run before the
program loads TensorFlow and JAX.
"""

import atexit
import contextlib
import datetime
import json
import os
import socket
import sys

from absl import logging

LOCK_FILE = '.detectax_lock'

_held: dict[str, int] = {}  # real path of a workdir -> nesting depth in this process
_taken = [0]  # acquisitions so far: each shares its outcome under its own key


class WorkdirInUseError(RuntimeError):
    """Another run holds the workdir."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), where /proc has it:
    tells a live holder from an unrelated process that reused its pid."""
    try:
        with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}, command: {holder.get('command')}")


def _stale_reason(holder: dict | None) -> str | None:
    """Why the lock's holder is known to be gone, or None if it may be running."""
    if holder is None:
        return 'the lock file is unreadable'
    if holder.get('host') != socket.gethostname():
        return None  # cannot tell from here
    pid = int(holder.get('pid', -1))
    if pid <= 0 or not _alive(pid):
        return f'pid {pid} no longer runs on this host'
    start = _process_start(pid)
    if holder.get('process_start') and start and start != holder['process_start']:
        return f'pid {pid} now belongs to another process'
    return None


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding='utf-8') as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def _busy_message(workdir: str, holder: dict) -> str:
    return (f'The workdir {workdir} is in use by another run ({_describe(holder)}). '
            f'Wait for it to finish or choose another --workdir; if that run is gone, '
            f'delete {os.path.join(workdir, LOCK_FILE)}.')


def exit_if_busy(argv: list[str]) -> None:
    """Exits at once if `--workdir` of a single-process command line is held
    by a live run; `acquire` takes the lock later (and checks again)."""
    if os.environ.get('JAX_COORDINATOR_ADDRESS') or \
            os.environ.get('DETECTAX_DISTRIBUTED', '0') not in ('', '0'):
        return  # the job's other processes see process 0's lock: acquire decides
    workdir = None
    for i, arg in enumerate(argv):
        if arg.startswith('--workdir='):
            workdir = arg.split('=', 1)[1]
        elif arg == '--workdir' and i + 1 < len(argv):
            workdir = argv[i + 1]
    if not workdir:
        return
    holder = _read(os.path.join(workdir, LOCK_FILE))
    if holder is not None and holder.get('pid') != os.getpid() and _stale_reason(holder) is None:
        sys.exit(f'WorkdirInUseError: {_busy_message(os.path.realpath(workdir), holder)}')


def _take(workdir: str) -> str | None:
    """Creates the lock file; returns why not, or None once held."""
    path = os.path.join(workdir, LOCK_FILE)
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
          'process_start': _process_start(os.getpid()),
          'command': ' '.join(sys.argv)[:500]}
    tmp = f'{path}.{me["host"]}.{me["pid"]}'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(me, f)
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic, and the lock is complete when it appears
                return None
            except FileExistsError:
                pass
            holder = _read(path)
            reason = _stale_reason(holder)
            if reason is None:
                return _busy_message(workdir, holder)
            aside = f'{path}.stale.{me["pid"]}'
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another process took it over first
            if _read(aside) != holder:  # a fresh lock was renamed: give it back
                os.rename(aside, path)
                continue
            os.remove(aside)
            logging.warning('Took over the stale lock %s (%s; it was held by %s).', path, reason,
                            _describe(holder or {}))
        return f'Could not take the lock {path}: other runs keep taking it.'
    finally:
        os.remove(tmp)


def _share(error: str | None, key: str) -> str | None:
    """Process 0's outcome, seen by every process of the job."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
        return error
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
    if jax.process_index() == 0:
        client.key_value_set(key, error or 'ok')
        return error
    value = client.blocking_key_value_get(key, 600_000)
    return None if value == 'ok' else f'Process 0 could not take the workdir: {value}'


def acquire(workdir: str) -> None:
    """Takes the workdir (re-entrant within a process).

    Raises:
      WorkdirInUseError: another run holds it.
      NotADirectoryError: the workdir is a file.
    """
    import jax  # pylint: disable=g-import-not-at-top
    real = os.path.realpath(workdir)
    if real in _held:
        _held[real] += 1
        return
    if os.path.exists(real) and not os.path.isdir(real):
        raise NotADirectoryError(f'--workdir={workdir} is a file, not a directory')
    error = None
    if jax.process_index() == 0:
        os.makedirs(real, exist_ok=True)
        error = _take(real)
    _taken[0] += 1
    error = _share(error, f'detectax_workdir_lock:{_taken[0]}:{real}')
    if error:
        raise WorkdirInUseError(error)
    _held[real] = 1
    atexit.register(_release_at_exit, real)


def release(workdir: str) -> None:
    """Gives the workdir back once the outermost `acquire` is released."""
    real = os.path.realpath(workdir)
    if real not in _held:
        return
    _held[real] -= 1
    if _held[real] == 0:
        del _held[real]
        _remove_own(real)


def _remove_own(real: str) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
        return
    path = os.path.join(real, LOCK_FILE)
    holder = _read(path)
    if holder and holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname():
        os.remove(path)


def _release_at_exit(real: str) -> None:
    if real in _held:
        del _held[real]
        _remove_own(real)


@contextlib.contextmanager
def hold(workdir: str):
    """`with hold(workdir):` runs with the workdir taken."""
    acquire(workdir)
    try:
        yield
    finally:
        release(workdir)
