"""Pickles as Python 2 wrote them, for the Caffe2-era checkpoint tests."""

import struct

import numpy as np


def _short_string(s: str) -> bytes:
    raw = s.encode('latin1')
    return b'U' + bytes([len(raw)]) + raw


def _python2_array(a: np.ndarray) -> bytes:
    """Opcodes Python 2's cPickle wrote for a float32 array (Caffe2-era R-50.pkl):
    numpy.core.multiarray._reconstruct, a dtype, and the bytes as a str."""
    a = np.ascontiguousarray(a, '<f4')
    dims = b''.join(b'J' + struct.pack('<i', d) for d in a.shape)
    raw = a.tobytes()
    return b''.join([
        b'cnumpy.core.multiarray\n_reconstruct\n', b'cnumpy\nndarray\n', b'K\x00\x85',
        _short_string('b'), b'\x87R', b'(K\x01(', dims, b't',
        b'cnumpy\ndtype\n', _short_string('f4'), b'K\x00K\x01\x87R',
        b'(K\x03', _short_string('<'), b'NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb',
        b'\x89', b'T', struct.pack('<i', len(raw)), raw, b'tb'])


def python2_pickle(arrays: dict[str, np.ndarray]) -> bytes:
    body = b''.join(_short_string(k) + _python2_array(v) for k, v in arrays.items())
    return b'\x80\x02}(' + body + b'u.'
