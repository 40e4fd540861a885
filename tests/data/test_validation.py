"""Bad data: every kind of problem is counted in the build report, or is an error."""

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from projects.maskrcnn.data import coco_builder
from projects.maskrcnn.data import validation

H, W = 20, 30


def _jpeg(h=H, w=W):
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(buffer, format='jpeg')
    return buffer.getvalue()


def _ann(ann_id, image_id, bbox, segmentation='box', category_id=1, **extra):
    if segmentation == 'box':
        x, y, w, h = bbox
        segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    ann = {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': bbox,
           'iscrowd': 0, 'area': 1.0, **extra}
    if segmentation is not None:
        ann['segmentation'] = segmentation
    return ann


def _write(tmp_path, files, annotations, image_sizes=None):
    """A COCO dataset: `files` {file_name: bytes or None (missing)}, image ids 0, 1, ..."""
    image_dir = tmp_path / 'images'
    image_dir.mkdir(exist_ok=True)
    images = []
    for image_id, (name, data) in enumerate(files.items()):
        if data is not None:
            (image_dir / name).write_bytes(data)
        h, w = (image_sizes or {}).get(name, (H, W))
        images.append({'id': image_id, 'file_name': name, 'height': h, 'width': w})
    coco = {'images': images, 'annotations': annotations,
            'categories': [{'id': 1, 'name': 'thing'}, {'id': 2, 'name': 'other'}]}
    (tmp_path / 'ann.json').write_text(json.dumps(coco))
    return str(tmp_path / 'ann.json'), str(image_dir)


def _build(tmp_path, files, annotations, skip=False, image_sizes=None, name='bad'):
    json_path, image_dir = _write(tmp_path, files, annotations, image_sizes)
    return coco_builder.build_coco_format_dataset(
        name, {'train': (json_path, image_dir), 'val': (json_path, image_dir)},
        str(tmp_path / 'tfds'), skip_bad_images=skip)


_BAD_IMAGES = {
    'missing_image': None,
    'unreadable_image': b'this is not an image',
    'truncated_image': _jpeg()[:-300],
}


@pytest.mark.parametrize('kind', sorted(_BAD_IMAGES))
def test_bad_image_is_an_error_naming_the_file(tmp_path, kind):
    files = {'good.jpg': _jpeg(), f'sub/{kind}.jpg': _BAD_IMAGES[kind]}
    (tmp_path / 'images' / 'sub').mkdir(parents=True)
    with pytest.raises(validation.BadImageError,
                       match=rf'{kind}: .*images/sub/{kind}\.jpg.*--skip_bad_images'):
        _build(tmp_path, files, [_ann(0, 1, [1, 1, 5, 5])])
    # Nothing half-built is left behind.
    assert coco_builder.prepared_versions('bad', str(tmp_path / 'tfds')) == []


def test_image_size_differing_from_the_json_is_an_error(tmp_path):
    with pytest.raises(validation.BadImageError,
                       match=r'image_size_mismatch: .*a\.jpg.*\(20, 31\).*\(20, 30\)'):
        _build(tmp_path, {'a.jpg': _jpeg()}, [], image_sizes={'a.jpg': (20, 31)})


def test_report_counts_every_problem_and_adds_up(tmp_path):
    files = {'ok.jpg': _jpeg(), 'empty.jpg': _jpeg(), 'missing.jpg': None,
             'broken.jpg': b'garbage', 'cut.jpg': _jpeg()[:-300]}
    rle = {'size': [H, W], 'counts': [5, 10, H * W - 15]}
    annotations = [
        _ann(10, 0, [2, 2, 8, 6]),                                   # fine
        _ann(11, 0, [2, 2, 8, 6], segmentation=rle, iscrowd=1),      # crowd, RLE
        _ann(12, 0, [2, 2, 8, 6], segmentation=None),                # box only
        _ann(13, 0, [20, 10, 20, 20]),                               # clipped to the image
        _ann(14, 0, [2, 2, 0, 6]),                                   # zero width
        _ann(15, 0, [2, 2, 8, 0]),                                   # zero height
        _ann(16, 0, [40, 2, 5, 5]),                                  # outside the image
        _ann(17, 0, [2, 2, 8, 6], segmentation=[[2, 2, 9, 9]]),      # 2-point polygon
        _ann(18, 0, [2, 2, 8, 6],                                    # one good part of two
             segmentation=[[2, 2, 10, 2, 10, 8], [1, 1]]),
        _ann(19, 0, [2, 2, 8, 6], segmentation={'size': [H, W + 1], 'counts': 'x'}),
        _ann(20, 0, [2, 2, 8, 6], segmentation={'size': [H, W], 'counts': [3, 4]}),
        _ann(21, 0, ['a', 2, 8, 6], segmentation=None),              # not numbers
        _ann(22, 99, [2, 2, 8, 6]),                                  # unknown image
        _ann(23, 0, [2, 2, 8, 6], category_id=7),                    # unknown category
        _ann(24, 2, [2, 2, 8, 6]),                                   # on a missing image
        _ann(25, 3, [2, 2, 8, 6]),                                   # on a broken image
        _ann(26, 0, [2, 2, 8, 6], segmentation=[[50, 50, 60, 50, 60, 60]]),  # no pixel
    ]
    builder = _build(tmp_path, files, annotations, skip=True)
    report = coco_builder.build_report(builder)['train']
    assert report.counts == {
        'crowd': 1, 'no_segmentation': 1, 'box_clipped': 1, 'empty_box': 2,
        'box_outside_image': 1, 'degenerate_polygon': 1, 'polygon_part_dropped': 1,
        'bad_segmentation': 2, 'bad_box': 1, 'unknown_image': 1, 'unknown_category': 1,
        'on_skipped_image': 2, 'missing_image': 1, 'unreadable_image': 1,
        'truncated_image': 1, 'empty_mask': 1, 'image_without_annotations': 1,
        'box_mask_mismatch': 1}
    assert report.examples['box_mask_mismatch'] == [11]  # the RLE lies left of its box
    assert report.examples['empty_box'] == [14, 15]
    assert report.examples['missing_image'] == [2]
    assert report.examples['on_skipped_image'] == [24, 25]
    # Counts plus kept items add up to the input.
    assert (report.images_in, report.annotations_in) == (5, 17)
    assert (report.images_kept, report.annotations_kept) == (2, 6)
    assert report.images_kept + report.total(validation.SKIPPED) == report.images_in
    assert report.annotations_kept + report.total(validation.DROPPED) == report.annotations_in
    text = report.format()
    assert 'unknown_category' in text and 'ids: 14, 15' in text

    examples = list(tfds.as_numpy(builder.as_dataset(split='train')))
    assert [int(e['image/id']) for e in examples] == [0, 1]
    objects = examples[0]['objects']
    assert objects['id'].tolist() == [10, 11, 12, 13, 18, 26]
    assert len(examples[1]['objects']['id']) == 0
    assert objects['has_mask'].tolist() == [True, True, False, True, True, False]
    assert objects['is_crowd'].tolist() == [False, True, False, False, False, False]
    np.testing.assert_allclose(objects['bbox'][3], [20, 10, 30, 20])  # clipped
    assert not objects['mask'][2].any()  # box only: empty mask, has_mask False
    assert objects['mask'][1, ..., 0].sum() == 10

    # The evaluation JSON holds what was kept, repaired as the report says.
    with open(coco_builder.eval_annotations_file(builder, 'val')) as f:
        coco = json.load(f)
    assert [im['id'] for im in coco['images']] == [0, 1]
    by_id = {a['id']: a for a in coco['annotations']}
    assert sorted(by_id) == [10, 11, 12, 13, 18, 26]
    assert by_id[13]['bbox'] == [20.0, 10.0, 10.0, 10.0]
    assert by_id[18]['segmentation'] == [[2, 2, 10, 2, 10, 8]]
    assert by_id[10] == annotations[0]  # untouched
    assert 'segmentation' not in by_id[12]


def test_check_image_reencodes_formats_tensorflow_cannot_read():
    buffer = io.BytesIO()
    Image.new('RGB', (W, H), (1, 2, 3)).save(buffer, format='tiff')
    checked = validation.check_image(buffer.getvalue(), 'x.tif', (H, W))
    assert checked.reencoded and Image.open(io.BytesIO(checked.data)).format == 'PNG'
    assert (checked.height, checked.width) == (H, W)
    jpeg = _jpeg()
    same = validation.check_image(jpeg, 'x.jpg', None)
    assert same.data == jpeg and not same.reencoded


def test_missing_image_size_is_read_from_the_file(tmp_path):
    json_path, image_dir = _write(tmp_path, {'a.jpg': _jpeg()}, [_ann(1, 0, [1, 1, 4, 4])])
    coco = json.load(open(json_path))
    del coco['images'][0]['height'], coco['images'][0]['width']
    with open(json_path, 'w') as f:
        json.dump(coco, f)
    builder = coco_builder.build_coco_format_dataset(
        'nosize', {'train': (json_path, image_dir)}, str(tmp_path / 'tfds'))
    assert coco_builder.build_report(builder)['train'].counts == {'image_size_from_file': 1}
    example = next(iter(tfds.as_numpy(builder.as_dataset(split='train'))))
    assert example['image/orig_size'].tolist() == [H, W]
    assert example['objects']['mask'].shape == (1, H, W, 1)


def test_totals_that_do_not_add_up_are_an_error():
    report = validation.SplitReport('x', images_in=2, annotations_in=1, images_kept=1)
    report.add('missing_image', 5)
    with pytest.raises(RuntimeError, match='input has 2 images and 1 annotations'):
        report.check_totals()
    report.add('on_skipped_image', 6)
    report.check_totals()
    with pytest.raises(KeyError, match='no_such_kind'):
        report.add('no_such_kind', 1)
