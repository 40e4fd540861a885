"""Reads checkpoint files without running code from them.

A pickle can call any importable function while it loads; model files come
from the internet. Both readers here admit a short list of globals, the ones
that rebuild numpy arrays and plain containers, and refuse everything else
with an error that names the file and the global:

- `load_pickle`: Detectron2 model-zoo `.pkl` files (a dict of numpy arrays,
  Python 3 pickles) and the older Caffe2/Detectron `.pkl` backbones such as
  `R-50.pkl` (Python 2 pickles, read with latin1 strings).
- `load_torch_zip`: PyTorch's zip `.pth` format (torch.save since PyTorch 1.6),
  without PyTorch: `<archive>/data.pkl` names tensor storages through
  persistent ids ('storage', storage type, key, location, numel) whose raw
  little-endian bytes are `<archive>/data/<key>`; tensors are rebuilt by
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
- `load_torch_state_dict`: `torch.load(weights_only=True)` where torch is
  installed (an optional extra), else `load_torch_zip`.

Only numpy is imported at module level.
"""

import codecs
import collections
import io
import os
import pickle
import zipfile
from typing import Any
from collections.abc import Callable

import numpy as np


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global outside the admitted list."""


class UnreadableFileError(pickle.UnpicklingError, ValueError):
    """The file is empty, truncated or not in the expected format; the message
    names the file."""


# What a truncated or random pickle stream raises while it loads.
_DECODE_ERRORS = (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
                  IndexError, KeyError, OverflowError, UnicodeDecodeError, zipfile.BadZipFile)


def _check_not_empty(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no such file')
    if os.path.getsize(path) == 0:
        raise UnreadableFileError(f'{path}: the file is empty (0 bytes)')


def _unreadable(path: str, what: str, error: Exception) -> UnreadableFileError:
    detail = str(error).splitlines()[0][:200] if str(error) else ''
    return UnreadableFileError(f'{path}: not a readable {what} (truncated or another format): '
                               f'{type(error).__name__}{": " + detail if detail else ""}')


def _checked_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f'object arrays are not admitted (dtype {dtype})')
    return dtype


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals that numpy's own pickles use, under numpy 1 and 2 module names."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    admitted = {}
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        admitted[(module, '_reconstruct')] = reconstruct
        admitted[(module, 'scalar')] = scalar
    for module in ('numpy.core.numeric', 'numpy._core.numeric'):
        admitted[(module, '_frombuffer')] = _frombuffer
    admitted[('numpy', 'ndarray')] = np.ndarray
    admitted[('numpy', 'dtype')] = _checked_dtype
    admitted[('collections', 'OrderedDict')] = collections.OrderedDict
    # Python 3 pickles bytes this way under protocol 2.
    admitted[('_codecs', 'encode')] = codecs.encode
    return admitted


def _frombuffer(buffer, dtype, shape, order):
    dtype = _checked_dtype(dtype)
    return np.frombuffer(buffer, dtype).reshape(shape, order=order).copy()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose find_class only returns the admitted globals."""

    def __init__(self, file, source: str, admitted: dict[tuple[str, str], Any], **kwargs):
        super().__init__(file, **kwargs)
        self._source = source
        self._admitted = admitted

    def find_class(self, module: str, name: str):
        try:
            return self._admitted[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(
                f'{self._source}: refusing to load, the pickle asks for {module}.{name}, '
                f'which is not one of the admitted globals '
                f'({", ".join(sorted(f"{m}.{n}" for m, n in self._admitted))})') from None


def _reject_object_arrays(value: Any, path: str) -> None:
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise pickle.UnpicklingError(f'{path}: object arrays are not admitted')
    if isinstance(value, dict):
        for v in value.values():
            _reject_object_arrays(v, path)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _reject_object_arrays(v, path)


def load_pickle(path: str) -> Any:
    """Reads a `.pkl` of numpy arrays and plain containers (see module docstring)."""
    _check_not_empty(path)
    with open(path, 'rb') as f:
        data = f.read()
    unpickler = _RestrictedUnpickler(io.BytesIO(data), path, _numpy_globals(),
                                     encoding='latin1')
    try:
        value = unpickler.load()
    except (ForbiddenGlobalError, UnreadableFileError):
        raise
    except _DECODE_ERRORS as e:
        raise _unreadable(path, 'pickle of numpy arrays', e) from e
    _reject_object_arrays(value, path)
    return value


# ----------------------------------------------------------------------------
# PyTorch's zip format
# ----------------------------------------------------------------------------

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _StorageType:
    """Stands in for torch.FloatStorage etc.: it only names a dtype."""

    def __init__(self, name: str):
        self.name = name


def _bfloat16_to_float32(raw: bytes) -> np.ndarray:
    bits = np.frombuffer(raw, '<u2').astype(np.uint32) << 16
    return bits.view(np.float32)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
    del unused  # requires_grad, backward hooks, metadata
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError(f'tensor storage is a {type(storage).__name__}')
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f'bad tensor layout: offset {offset}, size {size}, '
                                     f'stride {stride}')
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(f'tensor reads element {last} of a storage of '
                                     f'{storage.size}')
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(st * storage.itemsize for st in stride))
    return np.array(view)


def load_torch_zip(path: str) -> Any:
    """Reads a zip-format `.pth` without PyTorch; tensors become numpy arrays
    (bfloat16 as float32)."""
    _check_not_empty(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UnreadableFileError(
            f'{path}: not a zip-format PyTorch file (truncated or another format; files '
            f'saved by PyTorch < 1.6 need torch installed to read them)') from None
    try:
        with archive:
            return _load_torch_archive(path, archive)
    except (ForbiddenGlobalError, UnreadableFileError):
        raise
    except _DECODE_ERRORS + (OSError,) as e:
        raise _unreadable(path, 'PyTorch zip file', e) from e


def _load_torch_archive(path: str, archive: zipfile.ZipFile) -> Any:
    """The state stored in an open torch zip archive (see load_torch_zip)."""
    pickles = [n for n in archive.namelist() if n.endswith('data.pkl')]
    if len(pickles) != 1:
        raise ValueError(f'{path}: expected one data.pkl in the archive, found {pickles}')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if f'{prefix}byteorder' in archive.namelist():
        byteorder = archive.read(f'{prefix}byteorder').decode().strip()
    storages: dict[str, np.ndarray] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f'{path}: unexpected persistent id {pid!r}')
        _, storage_type, key, _, numel = pid
        if key not in storages:
            raw = archive.read(f'{prefix}data/{key}')
            dtype = _STORAGE_DTYPES[storage_type.name]
            if dtype == 'bfloat16':
                array = _bfloat16_to_float32(raw if byteorder == 'little' else
                                             np.frombuffer(raw, '>u2').astype('<u2').tobytes())
            else:
                order = '<' if byteorder == 'little' else '>'
                array = np.frombuffer(raw, np.dtype(dtype).newbyteorder(order)).astype(dtype)
            if array.size != int(numel):
                raise pickle.UnpicklingError(
                    f'{path}: storage {key} holds {array.size} elements, expected {numel}')
            storages[key] = array
        return storages[key]

    admitted: dict[tuple[str, str], Any] = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    }
    admitted.update({('torch', name): _StorageType(name) for name in _STORAGE_DTYPES})
    unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, admitted)
    unpickler.persistent_load = persistent_load
    return unpickler.load()


def _torch_loader() -> Callable[[str], Any] | None:
    try:
        import torch
    except ImportError:
        return None

    def load(path):
        def to_numpy(x):
            if isinstance(x, torch.Tensor):
                x = x.detach().cpu()
                return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
            if isinstance(x, dict):
                return type(x)((k, to_numpy(v)) for k, v in x.items())
            return x
        return to_numpy(torch.load(path, map_location='cpu', weights_only=True))

    return load


def load_torch_state_dict(path: str, use_torch: bool | None = None) -> Any:
    """Reads a `.pth`: with `torch.load(weights_only=True)` where torch imports
    (or `use_torch=True`), else with `load_torch_zip`."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    loader = _torch_loader() if use_torch is not False else None
    if use_torch and loader is None:
        raise ImportError('use_torch=True but torch is not installed')
    if loader is None:
        return load_torch_zip(path)
    _check_not_empty(path)
    try:
        return loader(path)
    except Exception:  # noqa: BLE001  (then the project's reader names the problem)
        # torch's message advises weights_only=False (running the file's code);
        # the project's reader says what is wrong with the file instead.
        return load_torch_zip(path)
