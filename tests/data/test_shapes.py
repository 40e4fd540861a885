"""Tests of the procedural shapes dataset generator."""

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from projects.maskrcnn.data import shapes

SMALL = dict(num_train=4, num_val=2, image_size=48, max_shapes=5)


def _read_split(files, split):
    json_path, image_dir = files[split]
    with open(json_path) as f:
        text = f.read()
    images = {name: open(os.path.join(image_dir, name), 'rb').read()
              for name in sorted(os.listdir(image_dir))}
    return text, images


def _decode(ann):
    seg = ann['segmentation']
    return mask_utils.decode({'size': seg['size'], 'counts': seg['counts'].encode()})


def test_same_seed_gives_identical_files(tmp_path):
    a = shapes.generate_shapes_coco(str(tmp_path / 'a'), seed=3, **SMALL)
    b = shapes.generate_shapes_coco(str(tmp_path / 'b'), seed=3, **SMALL)
    for split in ('train', 'val'):
        assert _read_split(a, split) == _read_split(b, split)


def test_different_seed_and_split_differ(tmp_path):
    a = shapes.generate_shapes_coco(str(tmp_path / 'a'), seed=3, **SMALL)
    b = shapes.generate_shapes_coco(str(tmp_path / 'b'), seed=4, **SMALL)
    assert _read_split(a, 'train')[1] != _read_split(b, 'train')[1]
    assert _read_split(a, 'train')[0] != _read_split(b, 'train')[0]
    # Train and val draw from different streams.
    assert _read_split(a, 'train')[1]['000001.png'] != _read_split(a, 'val')[1]['000001.png']


@pytest.mark.filterwarnings('ignore:os.fork')  # JAX may be up in this test process
def test_worker_processes_do_not_change_output(tmp_path):
    a = shapes.generate_shapes_coco(str(tmp_path / 'a'), seed=1, num_workers=0, **SMALL)
    b = shapes.generate_shapes_coco(str(tmp_path / 'b'), seed=1, num_workers=2, **SMALL)
    assert _read_split(a, 'train') == _read_split(b, 'train')


def test_coco_json_loads_and_has_expected_structure(shapes_files):
    json_path, image_dir = shapes_files['train']
    coco = COCO(json_path)
    cats = coco.loadCats(coco.getCatIds())
    assert [(c['id'], c['name']) for c in cats] == [
        (1, 'circle'), (2, 'rectangle'), (3, 'triangle')]
    assert sorted(coco.getImgIds()) == list(range(1, 13))
    ann_ids = coco.getAnnIds()
    assert len(ann_ids) == len(set(ann_ids)) > 0
    for img in coco.loadImgs(coco.getImgIds()):
        assert os.path.exists(os.path.join(image_dir, img['file_name']))
        assert (img['height'], img['width']) == (64, 64)
        # Every image gets at least one attempt and the first shape is never occluded.
        assert 1 <= len(coco.getAnnIds(imgIds=img['id'])) <= 4
    for ann in coco.loadAnns(ann_ids):
        assert ann['iscrowd'] == 0 and ann['category_id'] in (1, 2, 3)


def test_masks_consistent_with_bbox_and_area(shapes_files):
    with open(shapes_files['train'][0]) as f:
        coco = json.load(f)
    for ann in coco['annotations']:
        mask = _decode(ann)
        assert mask.shape == (64, 64)
        ys, xs = np.nonzero(mask)
        expected_box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        np.testing.assert_allclose(ann['bbox'], expected_box)
        assert ann['area'] == mask.sum() >= 30


def test_visible_masks_do_not_overlap(shapes_files):
    with open(shapes_files['train'][0]) as f:
        coco = json.load(f)
    per_image = {}
    for ann in coco['annotations']:
        per_image.setdefault(ann['image_id'], []).append(_decode(ann).astype(int))
    assert any(len(m) > 1 for m in per_image.values())
    for masks in per_image.values():
        assert np.sum(masks, axis=0).max() <= 1


def _full_mask(shape, size):
    window, cov = shapes._coverage(shape, size)
    mask = np.zeros((size, size), bool)
    mask[window] = cov >= 0.5
    return mask


def test_coverage_of_hand_computed_shapes():
    square = ('polygon', [(10, 12), (20, 12), (20, 30), (10, 30)])
    expected = np.zeros((40, 40), bool)
    expected[12:30, 10:20] = True
    np.testing.assert_array_equal(_full_mask(square, 40), expected)
    # Opposite orientation, partly outside the image: clipped, same convention.
    clipped = ('polygon', [(-5, 30), (-5, 50), (8, 50), (8, 30)])
    expected = np.zeros((40, 40), bool)
    expected[30:, :8] = True
    np.testing.assert_array_equal(_full_mask(clipped, 40), expected)
    window, cov = shapes._coverage(('circle', (20.0, 20.0, 8.0)), 40)
    assert abs(cov.sum() - np.pi * 64) < 1.0
    assert cov.max() == 1.0 and 0 < cov[0, 4] < 1  # anti-aliased edge
    assert shapes._coverage(('circle', (-30.0, 5.0, 4.0)), 40)[1].size == 0


def _render_with_shapes(monkeypatch, shape_list, size=48):
    """Renders with `_random_shape` returning `shape_list`, then off-image circles."""
    for seed in range(20):
        queue = list(shape_list)
        off_image = (1, ('circle', (-100.0, -100.0, 5.0)))
        monkeypatch.setattr(shapes, '_random_shape',
                            lambda rng, size: queue.pop(0) if queue else off_image)
        image, instances = shapes.render_shapes_image(np.random.default_rng(seed), size, 6)
        if len(shape_list) - len(queue) == len(shape_list):
            return image, instances
    raise AssertionError('no seed drew enough shapes')


def test_later_shapes_occlude_earlier_ones(monkeypatch):
    first = (2, ('polygon', [(4, 4), (30, 4), (30, 30), (4, 30)]))
    second = (1, ('circle', (30.0, 30.0, 10.0)))
    _, instances = _render_with_shapes(monkeypatch, [first, second])
    full_first, full_second = _full_mask(first[1], 48), _full_mask(second[1], 48)
    assert (full_first & full_second).sum() > 50  # they do overlap
    assert [c for c, _ in instances] == [2, 1]
    np.testing.assert_array_equal(instances[0][1], full_first & ~full_second)
    np.testing.assert_array_equal(instances[1][1], full_second)


def test_placement_hiding_an_earlier_shape_is_redrawn(monkeypatch):
    first = (3, ('polygon', [(10, 10), (20, 10), (15, 20)]))
    cover_all = (2, ('polygon', [(0, 0), (40, 0), (40, 40), (0, 40)]))
    beside = (1, ('circle', (35.0, 35.0, 6.0)))
    _, instances = _render_with_shapes(monkeypatch, [first, cover_all, beside])
    assert [c for c, _ in instances] == [3, 1]
    np.testing.assert_array_equal(instances[0][1], _full_mask(first[1], 48))


def test_rejects_bad_max_shapes(tmp_path):
    with pytest.raises(ValueError, match='max_shapes'):
        shapes.generate_shapes_coco(str(tmp_path), num_train=1, num_val=1, max_shapes=0)
