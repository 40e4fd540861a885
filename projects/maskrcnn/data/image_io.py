"""Reading image files into uint8 RGB pixels: one policy for the dataset, training and predict.

The rules, applied wherever an image file is read (the dataset builder, hence training and
evaluation, and predict; serving receives pixel arrays):
  EXIF orientation  applied: the image is read upright, as annotation tools (CVAT, labelme,
                    Label Studio) show it and as Detectron2's `read_image` reads it.
  16-bit            16-bit grayscale is scaled to 8 bits by value / 257 (rounded), so that
                    65535 is white; 16-bit colour is read as Pillow reads it (its high byte).
  alpha             dropped: the colour channels as stored (Detectron2 and torchvision do the
                    same), also for palette images with a transparent colour.
  CMYK, YCbCr, ...  converted to RGB by Pillow; grayscale and palette images are expanded.

A file that TensorFlow decodes exactly by these rules (an upright 8-bit RGB or grayscale JPEG,
an upright 8-bit RGB, grayscale or palette PNG without transparency) is stored by the builder
as it is and decoded by `tf.io.decode_image`, as in training; any other file is decoded here
and stored as a lossless PNG of the result. `decode` follows the same path, so predict sees
exactly the pixels that training and evaluation see.
"""

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
SWAPS_AXES = frozenset({5, 6, 7, 8})  # orientations that turn the image by 90 degrees
_SIXTEEN_BIT_GRAY = frozenset({'I;16', 'I;16B', 'I;16L', 'I;16N', 'I'})


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """An image as the dataset stores it.

    Attributes:
        data: bytes TensorFlow decodes to the pixels (the file's own bytes, or a PNG).
        height: upright height.
        width: upright width.
        orientation: the file's EXIF orientation tag (1 when absent).
        stored_size: (height, width) of the pixels as stored in the file, before EXIF.
        reencoded: `data` is a PNG written here, not the file's bytes.
    """
    data: bytes
    height: int
    width: int
    orientation: int
    stored_size: tuple[int, int]
    reencoded: bool


def open_image(data: bytes) -> Image.Image:
    """The fully decoded Pillow image (a truncated or corrupt file raises here).

    Raises:
        OSError, ValueError, SyntaxError, Image.DecompressionBombError: Pillow's errors.
    """
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes everything: a truncated file fails here
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag, 1 (upright) when absent or invalid."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # pylint: disable=broad-except  # malformed EXIF blocks raise anything
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _tensorflow_reads_as_is(image: Image.Image, data: bytes) -> bool:
    """Whether `tf.io.decode_image(data, channels=3)` gives the pixels of `to_rgb`."""
    if orientation(image) != 1:
        return False
    if image.format in ('JPEG', 'MPO'):
        return image.mode in ('RGB', 'L')
    if image.format == 'PNG':
        bit_depth = data[24] if len(data) > 24 else 0  # IHDR's bit depth field
        return ('transparency' not in image.info and
                (image.mode == 'P' or (image.mode in ('RGB', 'L') and bit_depth == 8)))
    return False


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [h, w, 3] of a Pillow image by the module's rules (upright, 8 bits, no alpha)."""
    if orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_GRAY or image.mode == 'F':
        values = np.asarray(image, np.float64)
        if image.mode != 'F':
            values = values / 257.0
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != 'RGB':
        with warnings.catch_warnings():  # palette transparency: dropped, as documented
            warnings.simplefilter('ignore')
            image = image.convert('RGB')
    return np.asarray(image, np.uint8)


def _encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='png', compress_level=1)
    return buffer.getvalue()


def stored_image(data: bytes) -> StoredImage:
    """What the dataset stores for a file's bytes (see the module docstring).

    Raises:
        Pillow's errors for unreadable or truncated files (see `open_image`).
    """
    image = open_image(data)
    tag = orientation(image)
    width, height = image.size
    stored_size = (height, width)
    if tag in SWAPS_AXES:
        height, width = width, height
    if _tensorflow_reads_as_is(image, data):
        return StoredImage(data, height, width, tag, stored_size, reencoded=False)
    return StoredImage(_encode_png(to_rgb(image)), height, width, tag, stored_size,
                       reencoded=True)


def decode(data: bytes) -> np.ndarray:
    """uint8 RGB [h, w, 3] of an image file's bytes, the pixels training sees for that file.

    Raises:
        Pillow's errors for unreadable or truncated files (see `open_image`).
    """
    image = open_image(data)
    if not _tensorflow_reads_as_is(image, data):
        return to_rgb(image)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # only for plain files
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
