"""Reading files that may be members of zip archives.

A path 'archive.zip/member/path' names a member of a zip: COCO's official zips (and an
annotation tool's export) can be read in place, without extracting them. Other paths go
through `tf.io.gfile`, so cloud storage works too.
"""

import zipfile

import tensorflow as tf

_open_zips: dict[str, zipfile.ZipFile] = {}


def _zip_member(path: str) -> tuple[str, str] | None:
    """('x.zip', 'a/b') for 'x.zip/a/b' (or ('x.zip', '') for 'x.zip'); None otherwise."""
    marker = path.find('.zip/')
    if marker >= 0:
        return path[:marker + 4], path[marker + 5:]
    return (path, '') if path.endswith('.zip') else None


def _zip(zip_path: str) -> zipfile.ZipFile:
    if zip_path not in _open_zips:
        _open_zips[zip_path] = zipfile.ZipFile(tf.io.gfile.GFile(zip_path, 'rb'))
    return _open_zips[zip_path]


def read_bytes(path: str) -> bytes:
    """The bytes of a file or of a zip member ('archive.zip/member'); FileNotFoundError."""
    member = _zip_member(path)
    if member is None:
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(path)
        with tf.io.gfile.GFile(path, 'rb') as f:
            return f.read()
    try:
        return _zip(member[0]).read(member[1])
    except KeyError:
        raise FileNotFoundError(path) from None


def path_exists(path: str) -> bool:
    """Whether a file, folder, zip or zip member ('archive.zip/member') exists."""
    member = _zip_member(path)
    if member is None or not member[1]:
        return tf.io.gfile.exists(path)
    if not tf.io.gfile.exists(member[0]):
        return False
    names = _zip(member[0]).namelist()
    return member[1] in names or any(n.startswith(member[1].rstrip('/') + '/') for n in names)
