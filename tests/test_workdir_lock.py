"""One run per workdir: a second one stops at once naming the holder; a dead
run's lock is taken over."""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from projects.maskrcnn import workdir_lock
from tests import run_utils


def _lock_path(workdir):
    return os.path.join(workdir, workdir_lock.LOCK_FILE)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_held_lock_names_this_process_and_is_released(tmp_path):
    workdir = str(tmp_path / 'run')
    with workdir_lock.hold(workdir):
        with workdir_lock.hold(workdir):  # re-entrant: main.py and the trainer both hold it
            pass
        holder = json.loads(pathlib.Path(_lock_path(workdir)).read_text(encoding='utf-8'))
        assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    assert not os.path.exists(_lock_path(workdir))


def test_second_main_stops_within_10_seconds_naming_the_holder(tmp_path):
    workdir = str(tmp_path / 'busy')
    with workdir_lock.hold(workdir):
        holder = json.loads(pathlib.Path(_lock_path(workdir)).read_text(encoding='utf-8'))
        start = time.monotonic()
        code, output = run_utils.run(
            run_utils.main_command(workdir, str(tmp_path / 'tfds')), run_utils.subprocess_env(),
            timeout=60)
        elapsed = time.monotonic() - start
    assert code != 0
    assert elapsed < 10, f'{elapsed:.1f} s'
    last = output.strip().splitlines()[-1]
    for part in (f'host {socket.gethostname()}', f'pid {os.getpid()}', holder['started']):
        assert part in last, last
    assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    workdir = tmp_path / 'crashed'
    workdir.mkdir()
    pid = _dead_pid()
    stale = {'host': socket.gethostname(), 'pid': pid, 'started': '2026-01-01T00:00:00+00:00'}
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger='absl'), workdir_lock.hold(str(workdir)):
        holder = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())
        assert holder['pid'] == os.getpid()
    messages = [r.getMessage() for r in caplog.records if 'stale lock' in r.getMessage()]
    assert len(messages) == 1 and f'pid {pid} no longer runs' in messages[0], messages


def test_lock_of_another_host_is_respected(tmp_path):
    workdir = tmp_path / 'elsewhere'
    workdir.mkdir()
    other = {'host': 'another-host', 'pid': 1, 'started': '2026-01-01T00:00:00+00:00'}
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(workdir_lock.WorkdirInUseError, match='host another-host, pid 1'):
        workdir_lock.acquire(str(workdir))
    assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text()) == other


def test_workdir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / 'file'
    path.write_text('x')
    with pytest.raises(NotADirectoryError, match=f'--workdir={path} is a file'):
        workdir_lock.acquire(str(path))
