"""Tests of the COCO-format TFDS builder."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils

from projects.maskrcnn.data import coco_builder
from projects.maskrcnn.data import coco_json
from projects.maskrcnn.data import validation


def _examples(builder, split, **kwargs):
    return list(tfds.as_numpy(builder.as_dataset(split=split, **kwargs)))


def test_shapes_round_trip_matches_json(shapes_builder, shapes_files):
    assert coco_builder.category_metadata(shapes_builder) == (
        [1, 2, 3], ['circle', 'rectangle', 'triangle'])
    for split in ('train', 'val'):
        json_path, image_dir = shapes_files[split]
        with open(json_path) as f:
            coco = json.load(f)
        raw = _examples(shapes_builder, split,
                        decoders={'image': tfds.decode.SkipDecoding()})
        examples = _examples(shapes_builder, split)
        assert [int(e['image/id']) for e in examples] == [im['id'] for im in coco['images']]
        for image_info, ex, raw_ex in zip(coco['images'], examples, raw):
            with open(os.path.join(image_dir, image_info['file_name']), 'rb') as f:
                assert raw_ex['image'] == f.read()  # the file's bytes, untouched
            assert ex['image/filename'].decode() == image_info['file_name']
            np.testing.assert_array_equal(ex['image/orig_size'], [64, 64])
            anns = [a for a in coco['annotations'] if a['image_id'] == image_info['id']]
            objects = ex['objects']
            np.testing.assert_array_equal(objects['id'], [a['id'] for a in anns])
            np.testing.assert_array_equal(objects['category_id'],
                                          [a['category_id'] for a in anns])
            np.testing.assert_array_equal(objects['label'],
                                          [a['category_id'] - 1 for a in anns])
            x, y, w, h = np.array([a['bbox'] for a in anns]).T
            np.testing.assert_allclose(objects['bbox'], np.stack([x, y, x + w, y + h], 1))
            np.testing.assert_allclose(objects['area'], [a['area'] for a in anns])
            assert not objects['is_crowd'].any()
            for ann, mask in zip(anns, objects['mask']):
                seg = ann['segmentation']
                expected = mask_utils.decode(
                    {'size': seg['size'], 'counts': seg['counts'].encode()})
                np.testing.assert_array_equal(mask[..., 0], expected)


def test_load_reopens_prepared_dataset(shapes_builder):
    data_dir = os.path.dirname(os.path.dirname(str(shapes_builder.data_dir)))
    again = coco_builder.load_coco_format_dataset('tiny_shapes', data_dir)
    assert again.info.splits['train'].num_examples == 12
    assert again.info.splits['val'].num_examples == 5
    with pytest.raises(FileNotFoundError, match='no_such_dataset'):
        coco_builder.load_coco_format_dataset('no_such_dataset', data_dir)


# A hand-written dataset: non-contiguous category ids (including 0) listed out of order,
# images listed out of order, a polygon, an uncompressed RLE crowd region, a compressed
# RLE and an image without annotations.
_RLE_MASK = np.zeros((20, 30), np.uint8)
_RLE_MASK[2:6, 20:27] = 1


def _uncompressed_rle(mask):
    flat = mask.flatten(order='F')  # COCO RLE runs are column-major, starting with zeros
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {'size': list(mask.shape), 'counts': counts}


def _write_hand_coco(tmp_path, categories=None):
    image_dir = tmp_path / 'images'
    image_dir.mkdir(exist_ok=True)
    for name, (h, w) in {'a.png': (20, 30), 'b.jpg': (16, 16), 'c.png': (20, 30)}.items():
        Image.new('RGB', (w, h), (10, 20, 30)).save(image_dir / name)
    compressed = mask_utils.encode(np.asfortranarray(_RLE_MASK))
    coco = {
        'images': [{'id': 9, 'file_name': 'c.png', 'height': 20, 'width': 30},
                   {'id': 2, 'file_name': 'a.png', 'height': 20, 'width': 30},
                   {'id': 7, 'file_name': 'b.jpg', 'height': 16, 'width': 16}],
        'annotations': [
            {'id': 31, 'image_id': 9, 'category_id': 3, 'iscrowd': 0, 'area': 28.0,
             'bbox': [20, 2, 7, 4], 'segmentation': {
                 'size': [20, 30], 'counts': compressed['counts'].decode()}},
            {'id': 12, 'image_id': 2, 'category_id': 0, 'iscrowd': 1, 'area': 28.0,
             'bbox': [20, 2, 7, 4], 'segmentation': _uncompressed_rle(_RLE_MASK)},
            {'id': 11, 'image_id': 2, 'category_id': 5, 'iscrowd': 0, 'area': 80.0,
             'bbox': [2, 3, 10, 8], 'segmentation': [[2, 3, 12, 3, 12, 11, 2, 11]]},
        ],
        'categories': categories or [{'id': 5, 'name': 'five'}, {'id': 0, 'name': 'zero'},
                                     {'id': 3, 'name': 'three'}],
    }
    json_path = tmp_path / 'instances.json'
    json_path.write_text(json.dumps(coco))
    return str(json_path), str(image_dir)


def test_hand_written_coco_maps_labels_and_decodes_all_formats(tmp_path):
    files = _write_hand_coco(tmp_path)
    builder = coco_builder.build_coco_format_dataset(
        'hand_coco', {'train': files, 'val': files}, str(tmp_path / 'tfds'))
    assert coco_builder.category_metadata(builder) == ([0, 3, 5], ['zero', 'three', 'five'])
    examples = _examples(builder, 'train')
    assert [int(e['image/id']) for e in examples] == [2, 7, 9]
    first, empty, last = (e['objects'] for e in examples)

    np.testing.assert_array_equal(first['id'], [11, 12])
    np.testing.assert_array_equal(first['category_id'], [5, 0])
    np.testing.assert_array_equal(first['label'], [2, 0])
    np.testing.assert_array_equal(first['is_crowd'], [False, True])
    assert first['has_mask'].all()
    np.testing.assert_allclose(first['bbox'], [[2, 3, 12, 11], [20, 2, 27, 6]])
    polygon = first['mask'][0, ..., 0]
    assert polygon.shape == (20, 30) and set(np.unique(polygon)) == {0, 1}
    assert polygon[4:10, 3:11].all() and not polygon[12:].any() and not polygon[:, 14:].any()
    assert abs(int(polygon.sum()) - 80) <= 20
    np.testing.assert_array_equal(first['mask'][1, ..., 0], _RLE_MASK)

    assert len(empty['id']) == 0 and empty['bbox'].shape == (0, 4)
    np.testing.assert_array_equal(examples[1]['image/orig_size'], [16, 16])
    assert examples[1]['image'].shape == (16, 16, 3)

    np.testing.assert_array_equal(last['label'], [1])
    np.testing.assert_array_equal(last['mask'][0, ..., 0], _RLE_MASK)
    np.testing.assert_array_equal(examples[2]['image'][0, 0], [10, 20, 30])


def test_splits_with_different_categories_are_rejected(tmp_path):
    (tmp_path / 'train').mkdir()
    (tmp_path / 'val').mkdir()
    train = _write_hand_coco(tmp_path / 'train')
    renamed = [{'id': 0, 'name': 'zero'}, {'id': 3, 'name': 'x'}, {'id': 5, 'name': 'five'}]
    val = _write_hand_coco(tmp_path / 'val', categories=renamed)
    with pytest.raises(ValueError, match='categories'):
        coco_builder.build_coco_format_dataset(
            'bad_coco', {'train': train, 'val': val}, str(tmp_path / 'tfds'))


def test_unknown_category_is_counted_and_left_out(tmp_path):
    json_path, _ = _write_hand_coco(tmp_path, categories=[{'id': 5, 'name': 'five'}])
    coco = coco_json.read_coco_annotations(json_path, 'train')
    assert coco.report.counts == {'unknown_category': 2}
    assert sorted(coco.report.examples['unknown_category']) == [12, 31]
    assert [a['id'] for anns in coco.annotations.values() for a in anns] == [11]


def test_structural_errors_name_the_problem(tmp_path):
    json_path, _ = _write_hand_coco(tmp_path)
    coco = json.loads(open(json_path).read())
    coco['images'].append(dict(coco['images'][0]))
    (tmp_path / 'dup.json').write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r'duplicate image ids \[9\]'):
        coco_json.read_coco_annotations(str(tmp_path / 'dup.json'))
    (tmp_path / 'not_coco.json').write_text(json.dumps({'images': []}))
    with pytest.raises(ValueError, match='not a COCO instances JSON'):
        coco_json.read_coco_annotations(str(tmp_path / 'not_coco.json'))


def test_segmentation_formats_agree():
    compressed = mask_utils.encode(np.asfortranarray(_RLE_MASK))
    as_str = {'size': [20, 30], 'counts': compressed['counts'].decode()}
    report = validation.SplitReport('x')
    for seg in (compressed, as_str, _uncompressed_rle(_RLE_MASK)):
        usable, mask = validation.decode_segmentation({'id': 1, 'segmentation': seg}, 20, 30,
                                                      report, {})
        assert usable
        np.testing.assert_array_equal(mask, _RLE_MASK)
    assert report.counts == {}
    # An RLE of another size than the image is dropped, not decoded.
    assert validation.decode_segmentation({'id': 2, 'segmentation': as_str}, 30, 20,
                                          report, {}) == (False, None)
    assert report.counts == {'bad_segmentation': 1}


def test_label_categories_skip_unused_background_and_rename_duplicates():
    categories = [{'id': 0, 'name': '_background_'}, {'id': 1, 'name': 'car'},
                  {'id': 2, 'name': 'Background'}, {'id': 7, 'name': 'car'}]
    assert coco_json.label_categories(categories, used_ids={1, 2}) == [
        {'id': 1, 'name': 'car (1)'}, {'id': 2, 'name': 'Background'},
        {'id': 7, 'name': 'car (7)'}]
