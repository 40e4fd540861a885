"""One decoding policy: the dataset builder (hence training) and predict see the same pixels."""

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from projects.maskrcnn import predict
from projects.maskrcnn.data import coco_builder
from projects.maskrcnn.data import image_io
from projects.maskrcnn.data import validation

H, W = 24, 40
_RNG = np.random.default_rng(0)
_RGB = _RNG.integers(0, 256, (H, W, 3), np.uint8)


def _save(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _exif(orientation):
    exif = Image.Exif()
    exif[image_io.EXIF_ORIENTATION] = orientation
    return exif


def _gray16():
    values = np.linspace(0, 65535, H * W).reshape(H, W).astype(np.uint16)
    return _save(Image.fromarray(values), 'png'), values


_FILES = {
    'gray16.png': _gray16()[0],
    'rgba.png': _save(Image.fromarray(np.dstack([_RGB, np.full((H, W), 7, np.uint8)])), 'png'),
    'cmyk.jpg': _save(Image.fromarray(_RGB).convert('CMYK'), 'jpeg', quality=95),
    'rotated.jpg': _save(Image.fromarray(_RGB), 'jpeg', exif=_exif(6)),
    'plain.jpg': _save(Image.fromarray(_RGB), 'jpeg'),
}
_UPRIGHT_SIZE = {'rotated.jpg': (W, H)}  # orientation 6 turns it by 90 degrees


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp('formats')
    (root / 'images').mkdir()
    images = []
    for image_id, (name, data) in enumerate(_FILES.items(), start=1):
        (root / 'images' / name).write_bytes(data)
        h, w = _UPRIGHT_SIZE.get(name, (H, W))
        images.append({'id': image_id, 'file_name': name, 'height': h, 'width': w})
    coco = {'images': images, 'annotations': [], 'categories': [{'id': 1, 'name': 'x'}]}
    (root / 'ann.json').write_text(json.dumps(coco))
    split = (str(root / 'ann.json'), str(root / 'images'))
    builder = coco_builder.build_coco_format_dataset(
        'formats', {'train': split, 'val': split}, str(root / 'tfds'))
    return root, builder


def test_predict_reads_the_pixels_the_builder_stores(built):
    root, builder = built
    stored = {ex['image/filename'].decode(): ex['image']
              for ex in tfds.as_numpy(builder.as_dataset(split='train'))}
    assert sorted(stored) == sorted(_FILES)
    for name in _FILES:
        pixels = predict.load_image(str(root / 'images' / name))
        assert pixels.dtype == np.uint8 and pixels.shape == stored[name].shape, name
        np.testing.assert_array_equal(pixels, stored[name], err_msg=name)


def test_each_format_is_read_by_the_documented_rule(built):
    root, _ = built
    read = {name: predict.load_image(str(root / 'images' / name)) for name in _FILES}
    # 16-bit grayscale: value / 257, not white (Pillow's convert('RGB') saturates it).
    expected = np.round(_gray16()[1] / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(read['gray16.png'], np.repeat(expected[..., None], 3, 2))
    np.testing.assert_array_equal(read['rgba.png'], _RGB)  # alpha dropped
    raw = np.asarray(Image.open(io.BytesIO(_FILES['rotated.jpg'])).convert('RGB'))
    np.testing.assert_array_equal(read['rotated.jpg'], np.rot90(raw, k=-1))  # upright
    assert np.abs(read['cmyk.jpg'].astype(int) - _RGB).mean() < 8  # colours kept


def test_the_report_counts_reencoded_and_rotated_images(built):
    _, builder = built
    report = coco_builder.build_report(builder)['train']
    assert report.counts['exif_orientation'] == 1
    assert report.examples['exif_orientation'] == [4]
    assert report.counts['reencoded_image'] == 3  # 16-bit, RGBA, CMYK; not the plain JPEG
    raw = {ex['image/filename'].decode(): ex['image'] for ex in tfds.as_numpy(
        builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()}))}
    assert raw['plain.jpg'] == _FILES['plain.jpg']  # stored untouched


def test_square_rotated_image_and_one_without_size_are_counted(tmp_path):
    square = _save(Image.fromarray(_RGB[:, :H]), 'jpeg', exif=_exif(8))
    stored = validation.check_image(square, 'sq.jpg', (H, H))
    assert stored.orientation == 8 and stored.reencoded
    np.testing.assert_array_equal(image_io.decode(stored.data), image_io.decode(square))
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'sq.jpg').write_bytes(square)
    coco = {'images': [{'id': 1, 'file_name': 'sq.jpg'}], 'annotations': [],
            'categories': [{'id': 1, 'name': 'x'}]}
    (tmp_path / 'a.json').write_text(json.dumps(coco))
    split = (str(tmp_path / 'a.json'), str(tmp_path / 'images'))
    builder = coco_builder.build_coco_format_dataset('sq', {'train': split, 'val': split},
                                                     str(tmp_path / 'tfds'))
    counts = coco_builder.build_report(builder)['train'].counts
    assert counts['exif_orientation'] == 1 and counts['image_size_from_file'] == 1


def test_json_size_of_the_unrotated_image_is_an_error_that_explains_exif():
    with pytest.raises(validation.BadImageError,
                       match=r'image_size_mismatch: r\.jpg: .*\(24, 40\).*\(40, 24\).*EXIF'):
        validation.check_image(_FILES['rotated.jpg'], 'r.jpg', (H, W))
