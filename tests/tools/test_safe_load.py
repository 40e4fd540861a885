"""Tests for tools/safe_load.py: real torch and pickle files in, numpy out, code refused."""

import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from projects.maskrcnn.tools import safe_load
from tests.tools.legacy_pickles import python2_pickle

GOLDEN = pathlib.Path(__file__).parent / 'golden'


class _RunsACommand:
    """Unpickling this calls os.system, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_torch_zip_reader_rebuilds_dtypes_and_strided_views():
    # Written by torch.save in tools/make_golden.py (write_layouts_pth).
    state = safe_load.load_torch_zip(str(GOLDEN / 'torch_layouts.pth'))
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    expected = {
        'contiguous': base, 'transposed': base.T, 'rows_1_to_2': base[1:],
        'every_other_column': base[:, ::2],
        'half': np.array([0.5, -2.0, 3.25], np.float16),
        'bfloat16': np.array([1.5, -0.25, 96.0], np.float32),
        'double': np.array([1e-300, 2.0], np.float64), 'int64_scalar': np.array(7, np.int64),
        'bool': np.array([True, False, True]), 'uint8': np.array([0, 255, 3], np.uint8)}
    assert list(state) == list(expected)
    for name, want in expected.items():
        assert state[name].dtype == want.dtype, name
        assert state[name].shape == want.shape, name
        np.testing.assert_array_equal(state[name], want, err_msg=name)


def test_load_torch_state_dict_falls_back_to_the_zip_reader():
    state = safe_load.load_torch_state_dict(str(GOLDEN / 'torch_layouts.pth'), use_torch=False)
    np.testing.assert_array_equal(state['transposed'], np.arange(12.0).reshape(3, 4).T)


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_pickle_reader_reads_numpy_dicts(tmp_path, protocol):
    data = {'model': {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
                      'b.bias': np.array([1.5], np.float64), 'n': np.int64(3)},
            '__author__': 'Detectron2 Model Zoo', 'matching_heuristics': True}
    path = tmp_path / 'model.pkl'
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = safe_load.load_pickle(str(path))
    assert loaded['__author__'] == 'Detectron2 Model Zoo'
    np.testing.assert_array_equal(loaded['model']['a.weight'], data['model']['a.weight'])
    assert loaded['model']['b.bias'].dtype == np.float64
    assert int(loaded['model']['n']) == 3


def test_pickle_reader_reads_python2_pickles(tmp_path):
    arrays = {'conv1_w': np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
              'res_conv1_bn_s': np.array([0.5, 2.0], np.float32)}
    path = tmp_path / 'R-50.pkl'
    path.write_bytes(python2_pickle(arrays))
    loaded = safe_load.load_pickle(str(path))
    for name, want in arrays.items():
        np.testing.assert_array_equal(loaded[name], want)


def test_pickle_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'model': {'w': _RunsACommand(marker)}}))
    with pytest.raises(safe_load.ForbiddenGlobalError) as error:
        safe_load.load_pickle(str(path))
    message = str(error.value)
    assert str(path) in message and f'{os.system.__module__}.system' in message
    assert not marker.exists()


def test_torch_zip_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('evil/data.pkl', pickle.dumps({'w': _RunsACommand(marker)}, protocol=2))
        archive.writestr('evil/byteorder', 'little')
    with pytest.raises(safe_load.ForbiddenGlobalError, match=r'evil\.pth.*system'):
        safe_load.load_torch_state_dict(str(path), use_torch=False)
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / 'objects.pkl'
    path.write_bytes(pickle.dumps({'w': np.array([1, 'text'], dtype=object)}))
    with pytest.raises(pickle.UnpicklingError, match='object'):
        safe_load.load_pickle(str(path))


def test_torch_zip_with_an_out_of_range_view_is_refused(tmp_path):
    # A tensor of 4 elements over a 3-element storage must not read past it.
    with zipfile.ZipFile(GOLDEN / 'torch_layouts.pth') as archive:
        names = archive.namelist()
        prefix = [n for n in names if n.endswith('data.pkl')][0][:-len('data.pkl')]
        data = archive.read(f'{prefix}data.pkl')
        copied = {n: archive.read(n) for n in names}
    # Rewrite the size of the last tensor ('uint8') from (3,) to (4,).
    tail = data[data.rindex(b'uint8'):]
    patched_tail = tail.replace(b'K\x03\x85', b'K\x04\x85', 1)
    assert patched_tail != tail
    copied[f'{prefix}data.pkl'] = data[:data.rindex(b'uint8')] + patched_tail
    path = tmp_path / 'bad.pth'
    with zipfile.ZipFile(path, 'w') as archive:
        for name, content in copied.items():
            archive.writestr(name, content)
    with pytest.raises(pickle.UnpicklingError, match='storage'):
        safe_load.load_torch_zip(str(path))
