"""The converter refuses files it cannot use, naming the file, and writes nothing."""

import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from projects.maskrcnn.tools import convert_checkpoint as cc

TINY_PTH = pathlib.Path(__file__).parent / 'golden' / 'torchvision_tiny_maskrcnn.pth'
REPO = pathlib.Path(__file__).parents[2]
# Where a reader's own error may appear, it follows the file's name and what is wrong.
HIDDEN_CAUSES = ('weights_only', 'Traceback')


def _refused(capsys, source, path, out):
    code = cc.main([f'--source={source}', str(path), str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert str(path) in err, err
    assert not os.path.exists(out), 'a refused conversion must write nothing'
    return err


def test_file_of_another_model_is_refused_naming_its_keys(capsys, tmp_path):
    other = {'model': {f'encoder.layers.{i}.attention.weight': np.ones((2, 2), np.float32)
                       for i in range(12)}}
    path = tmp_path / 'bert.pkl'
    path.write_bytes(pickle.dumps(other))
    err = _refused(capsys, 'detectron2', path, tmp_path / 'out')
    assert 'no tensor converts' in err
    assert 'encoder.layers.0.attention.weight' in err   # the first unknown keys, sorted
    assert '12 in all' in err


def test_torchvision_file_read_as_mae_is_refused(capsys, tmp_path):
    err = _refused(capsys, 'mae', TINY_PTH, tmp_path / 'out')
    assert 'no tensor converts' in err and 'backbone.body' in err


@pytest.mark.parametrize('name, make', [
    ('empty.pkl', lambda: b''),
    ('empty.pth', lambda: b''),
    ('random.pkl', lambda: np.random.default_rng(0).bytes(4096)),
    ('random.pth', lambda: np.random.default_rng(1).bytes(4096)),
    ('truncated.pth', lambda: TINY_PTH.read_bytes()[:TINY_PTH.stat().st_size // 2]),
    ('truncated.pkl', lambda: pickle.dumps(
        {'model': {'backbone.bottom_up.stem.conv1.weight': np.ones((8, 3, 7, 7), np.float32)}}
    )[:300]),
])
def test_unreadable_files_are_named(capsys, tmp_path, name, make):
    path = tmp_path / name
    path.write_bytes(make())
    err = _refused(capsys, 'detectron2' if name.endswith('.pkl') else 'torchvision',
                   path, tmp_path / 'out')
    last = err.strip().splitlines()[-1]
    assert last.startswith(f'error: {path}: '), last
    assert 'empty (0 bytes)' in last if 'empty' in name else 'truncated or another format' in last
    assert not any(cause in err for cause in HIDDEN_CAUSES), err


def test_command_line_exit_code_is_non_zero(tmp_path):
    path = tmp_path / 'empty.pth'
    path.write_bytes(b'')
    proc = subprocess.run(
        [sys.executable, '-m', 'projects.maskrcnn.tools.convert_checkpoint',
         '--source=torchvision', str(path), str(tmp_path / 'out')],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f'error: {path}: the file is empty (0 bytes)'
