"""Tests for evaluation.py on a tiny hand-written COCO ground truth."""

import contextlib
import io
import json

import numpy as np
from pycocotools import coco
from pycocotools import mask as mask_utils
import pytest

from projects.maskrcnn import evaluation

# pycocotools' decode() trips a numpy 2 deprecation warning; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    'ignore:__array__ implementation:DeprecationWarning')

# Label k (1..K) is category CATEGORY_IDS[k - 1]; deliberately neither sorted
# nor contiguous, and 0 is a real category id.
CATEGORY_IDS = (42, 0, 7)
LABEL_OF = {cat: label + 1 for label, cat in enumerate(CATEGORY_IDS)}
IMAGES = {1: (100, 120), 2: (80, 60), 3: (90, 90)}  # id: (height, width)
MASK_SIZE = 28
MAX_DETECTIONS = 6


def _rect_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _uncompressed_rle(mask):
    """COCO's crowd format: run lengths of the column-major mask, zeros first."""
    flat = mask.flatten(order='F').astype(np.int64)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {'counts': counts, 'size': list(mask.shape)}


def _ground_truth():
    crowd = np.zeros(IMAGES[1], np.uint8)
    crowd[60:95, 5:45] = 1
    anns = [
        # (image, category, segmentation, bbox xywh, area, iscrowd)
        (1, 0, _rect_polygon(10, 10, 40, 30), [10, 10, 40, 30], 1200, 0),
        (1, 42, [[60, 20, 110, 20, 85, 90]], [60, 20, 50, 70], 1750, 0),
        (1, 7, _uncompressed_rle(crowd), [5, 60, 40, 35], 1400, 1),
        (2, 7, _rect_polygon(5, 5, 40, 50), [5, 5, 40, 50], 2000, 0),
        (2, 0, _rect_polygon(35, 55, 20, 20), [35, 55, 20, 20], 400, 0),
    ]
    return {
        'images': [{'id': i, 'height': h, 'width': w, 'file_name': f'{i}.jpg'}
                   for i, (h, w) in IMAGES.items()],
        'categories': [{'id': c, 'name': f'cat{c}'} for c in (0, 7, 42)],
        'annotations': [
            {'id': n + 1, 'image_id': img, 'category_id': cat,
             'segmentation': seg, 'bbox': bbox, 'area': area, 'iscrowd': crowd}
            for n, (img, cat, seg, bbox, area, crowd) in enumerate(anns)],
    }


@pytest.fixture(name='gt')
def fixture_gt(tmp_path):
    path = tmp_path / 'instances.json'
    path.write_text(json.dumps(_ground_truth()))
    with contextlib.redirect_stdout(io.StringIO()):
        return str(path), coco.COCO(str(path))


def _box_crop(mask, box_xyxy):
    """[28, 28] fraction of each box cell covered by `mask` (4x4 samples/cell)."""
    x0, y0, x1, y1 = box_xyxy
    steps = (np.arange(MASK_SIZE * 4) + 0.5) / (MASK_SIZE * 4)
    ys = np.clip((y0 + steps * (y1 - y0)).astype(int), 0, mask.shape[0] - 1)
    xs = np.clip((x0 + steps * (x1 - x0)).astype(int), 0, mask.shape[1] - 1)
    samples = mask[ys[:, None], xs[None, :]].astype(np.float32)
    return samples.reshape(MASK_SIZE, 4, MASK_SIZE, 4).mean(axis=(1, 3))


def _perfect_detections(coco_gt, image_id):
    """(box_xyxy, label, score, mask) for every GT instance of the image.

    The crowd region gets a detection too; COCOeval must ignore it.
    """
    dets = []
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id])):
        x, y, w, h = ann['bbox']
        box = np.array([x, y, x + w, y + h], np.float32)
        mask = _box_crop(coco_gt.annToMask(ann), box)
        score = 0.5 if ann['iscrowd'] else 0.9
        dets.append((box, LABEL_OF[ann['category_id']], score, mask))
    return dets


def _make_batch(per_image, image_ids, scales=None, batch_mask=None, masks=True):
    """Pads per-image detection lists into the evaluator's batch arrays."""
    size = len(image_ids)
    scales = np.ones(size) if scales is None else np.asarray(scales)
    preds = {
        'detection_boxes': np.zeros((size, MAX_DETECTIONS, 4), np.float32),
        'detection_scores': np.zeros((size, MAX_DETECTIONS), np.float32),
        'detection_classes': np.zeros((size, MAX_DETECTIONS), np.int32),
        'detection_valid': np.zeros((size, MAX_DETECTIONS), bool),
        'detection_masks': np.zeros(
            (size, MAX_DETECTIONS, MASK_SIZE, MASK_SIZE), np.float32),
    }
    for i, dets in enumerate(per_image):
        for j, (box, label, score, mask) in enumerate(dets):
            preds['detection_boxes'][i, j] = box * scales[i]
            preds['detection_classes'][i, j] = label
            preds['detection_scores'][i, j] = score
            preds['detection_valid'][i, j] = True
            preds['detection_masks'][i, j] = mask
    # Entries that are not valid, or have class 0, must be ignored.
    preds['detection_classes'][:, -1] = 1
    preds['detection_valid'][:, -2] = True
    if not masks:
        del preds['detection_masks']
    batch = {
        'image_id': np.asarray(image_ids, np.int32),
        'orig_size': np.array([IMAGES.get(i, (50, 50)) for i in image_ids],
                              np.int32),
        'image_size': np.array([[round(s * h), round(s * w)] for s, (h, w) in zip(
            scales, [IMAGES.get(i, (50, 50)) for i in image_ids])], np.int32),
        'image_scale': scales.astype(np.float32),
        'batch_mask': (np.ones(size, np.float32) if batch_mask is None
                       else np.asarray(batch_mask, np.float32)),
    }
    return preds, batch


def _evaluate(path, batches, output_dir=None):
    evaluator = evaluation.CocoEvaluator(path, CATEGORY_IDS, output_dir=output_dir)
    for preds, batch in batches:
        evaluator.add_batch(preds, batch)
    return evaluator.compute_metrics()


def test_perfect_predictions_score_close_to_100(gt):
    path, coco_gt = gt
    dets = [_perfect_detections(coco_gt, i) for i in (1, 2, 3)]
    metrics = _evaluate(path, [_make_batch(dets[:2], [1, 2]),
                               _make_batch(dets[2:], [3])])
    assert sorted(metrics) == sorted(evaluation.metric_names())
    for name in ('box_AP', 'box_AP50', 'box_AP75', 'box_APs', 'box_APm'):
        assert metrics[name] == pytest.approx(100.0), name
    # Pasted 28x28 crops are not pixel-exact (95.0 when written), so only the
    # loose IoU thresholds are perfect.
    assert metrics['mask_AP50'] == pytest.approx(100.0)
    assert metrics['mask_AP75'] == pytest.approx(100.0)
    assert metrics['mask_AP'] > 90.0
    # No GT is large: COCOeval's -1 is reported as 0.
    assert metrics['box_APl'] == 0.0
    assert metrics['mask_APl'] == 0.0


def test_wrong_classes_score_zero(gt):
    path, coco_gt = gt
    dets = [[(box, label % 3 + 1, score, mask)
             for box, label, score, mask in _perfect_detections(coco_gt, i)]
            for i in (1, 2)]
    metrics = _evaluate(path, [_make_batch(dets, [1, 2])])
    assert metrics['box_AP'] == pytest.approx(0.0)
    assert metrics['mask_AP'] == pytest.approx(0.0)
    assert metrics['box_AP50'] == pytest.approx(0.0)


def test_masks_are_evaluated_separately_from_boxes(gt):
    path, coco_gt = gt
    dets = [[(box, label, score, np.zeros_like(mask))
             for box, label, score, mask in _perfect_detections(coco_gt, i)]
            for i in (1, 2)]
    metrics = _evaluate(path, [_make_batch(dets, [1, 2])])
    assert metrics['box_AP'] == pytest.approx(100.0)
    assert metrics['mask_AP'] == pytest.approx(0.0)


def test_mask_size_ranges_use_the_mask_area(gt):
    path, coco_gt = gt
    dets = _perfect_detections(coco_gt, 2)
    # A higher-scoring false positive of the small GT's class: its box is
    # medium (40 x 40) but its mask is small (about 15 x 15), so it must count
    # against mask APs (with the box area COCOeval would ignore it there).
    tiny_mask = np.zeros((MASK_SIZE, MASK_SIZE), np.float32)
    tiny_mask[10:20, 10:20] = 1.0
    dets.append((np.array([5, 5, 45, 45], np.float32), LABEL_OF[0], 0.95,
                 tiny_mask))
    metrics = _evaluate(path, [_make_batch([dets], [2])])
    assert metrics['box_APs'] == pytest.approx(100.0)
    assert metrics['mask_APs'] < 60.0


def test_empty_predictions_give_zeros(gt):
    path, _ = gt
    metrics = _evaluate(path, [_make_batch([[], []], [1, 2])])
    assert metrics == dict.fromkeys(evaluation.metric_names(), 0.0)
    evaluator = evaluation.CocoEvaluator(path, CATEGORY_IDS)
    assert evaluator.compute_metrics() == dict.fromkeys(
        evaluation.metric_names(), 0.0)


def test_image_scale_is_undone(gt, tmp_path):
    path, coco_gt = gt
    dets = [_perfect_detections(coco_gt, i) for i in (1, 2)]
    reference = _evaluate(path, [_make_batch(dets, [1, 2])])
    scaled = _evaluate(path, [_make_batch(dets, [1, 2], scales=[0.5, 1.7])],
                       output_dir=str(tmp_path))
    assert scaled == pytest.approx(reference)
    results = json.loads((tmp_path / evaluation.RESULTS_FILENAME).read_text())
    by_ann = {(r['image_id'], r['category_id']): r['bbox'] for r in results}
    np.testing.assert_allclose(by_ann[(1, 42)], [60, 20, 50, 70], atol=1e-3)
    np.testing.assert_allclose(by_ann[(2, 0)], [35, 55, 20, 20], atol=1e-3)


def test_padding_examples_are_ignored(gt):
    path, coco_gt = gt
    dets = [_perfect_detections(coco_gt, i) for i in (1, 2)]
    garbage = [(np.array([0, 0, 30, 30], np.float32), 1, 1.0,
                np.ones((MASK_SIZE, MASK_SIZE)))] * 3
    # Padding repeats a real image id, or carries one unknown to the GT.
    batch = _make_batch([dets[0], garbage, dets[1], garbage], [1, 1, 2, 0],
                        batch_mask=[1, 0, 1, 0])
    metrics = _evaluate(path, [batch])
    assert metrics['box_AP'] == pytest.approx(100.0)
    assert metrics['mask_AP50'] == pytest.approx(100.0)


def test_results_file_is_valid_coco_results(gt, tmp_path):
    path, coco_gt = gt
    dets = [_perfect_detections(coco_gt, i) for i in (1, 2)]
    out_dir = tmp_path / 'eval'
    _evaluate(path, [_make_batch(dets, [1, 2])], output_dir=str(out_dir))
    results_path = str(out_dir / evaluation.RESULTS_FILENAME)
    results = json.loads((out_dir / evaluation.RESULTS_FILENAME).read_text())
    assert len(results) == 5  # Four instances and the crowd region.
    assert {r['category_id'] for r in results} == {0, 7, 42}
    assert all(isinstance(r['segmentation']['counts'], str) for r in results)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = coco_gt.loadRes(results_path)
    assert len(loaded.getAnnIds()) == 5
    # The triangle's pasted mask overlaps its ground truth well.
    triangle = next(r for r in results if r['category_id'] == 42)
    gt_rle = coco_gt.annToRLE(coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[42]))[0])
    iou = mask_utils.iou([triangle['segmentation']], [gt_rle], [0])[0, 0]
    assert iou > 0.85


def test_boxes_are_clipped_to_the_original_image(gt):
    path, _ = gt
    # Image 2 is 80 x 60 (h x w); at scale 2 the box ends at (80, 100) original.
    # The mask's left half is on: it must be pasted into the unclipped box,
    # whose centre is x = 35 (the clipped box's centre is x = 30).
    left_half = np.zeros((MASK_SIZE, MASK_SIZE), np.float32)
    left_half[:, :MASK_SIZE // 2] = 1.0
    dets = [[(np.array([-10, 50, 80, 100], np.float32), 2, 0.8, left_half)]]
    evaluator = evaluation.CocoEvaluator(path, CATEGORY_IDS)
    preds, batch = _make_batch(dets, [2])
    preds['detection_boxes'] *= 2.0
    batch['image_scale'][:] = 2.0
    batch['image_size'] = batch['orig_size'] * 2
    evaluator.add_batch(preds, batch)
    (result,) = evaluator.results
    np.testing.assert_allclose(result['bbox'], [0, 50, 60, 30])
    assert result['category_id'] == 0
    mask = mask_utils.decode(result['segmentation'])
    assert mask.shape == (80, 60)
    assert mask[51:, :35].all()
    assert not mask[:50].any() and not mask[:, 36:].any()


def test_box_only_evaluation_and_reset(gt, tmp_path):
    path, coco_gt = gt
    dets = [_perfect_detections(coco_gt, i) for i in (1, 2)]
    evaluator = evaluation.CocoEvaluator(path, CATEGORY_IDS,
                                         output_dir=str(tmp_path))
    evaluator.add_batch(*_make_batch(dets, [1, 2], masks=False))
    metrics = evaluator.compute_metrics()
    assert sorted(metrics) == sorted(evaluation.metric_names(with_masks=False))
    assert metrics['box_AP'] == pytest.approx(100.0)
    results = json.loads((tmp_path / evaluation.RESULTS_FILENAME).read_text())
    assert results and 'segmentation' not in results[0]
    with pytest.raises(ValueError, match='detection_masks'):
        evaluator.add_batch(*_make_batch(dets, [1, 2]))
    evaluator.reset()
    assert not evaluator.results
    evaluator.add_batch(*_make_batch([[]], [3]))
    assert evaluator.compute_metrics() == dict.fromkeys(
        evaluation.metric_names(), 0.0)


def test_bad_inputs_raise(gt):
    path, _ = gt
    with pytest.raises(ValueError, match='5'):
        evaluation.CocoEvaluator(path, (0, 7, 5))
    evaluator = evaluation.CocoEvaluator(path, CATEGORY_IDS)
    with pytest.raises(ValueError, match='99'):
        evaluator.add_batch(*_make_batch([[]], [99]))
    dets = [[(np.array([0, 0, 5, 5], np.float32), 4, 0.5,
              np.ones((MASK_SIZE, MASK_SIZE)))]]
    with pytest.raises(ValueError, match='1..3'):
        evaluator.add_batch(*_make_batch(dets, [1]))


@pytest.mark.parametrize('segmentation', [None, []])
def test_box_only_ground_truth_counts_for_boxes_and_is_ignored_for_masks(tmp_path, segmentation):
    data = _ground_truth()
    # Image 3 gets one annotation with a box but no mask (missing or empty).
    box_only = {'id': 99, 'image_id': 3, 'category_id': 42, 'bbox': [20, 20, 30, 30],
                'area': 900, 'iscrowd': 0}
    if segmentation is not None:
        box_only['segmentation'] = segmentation
    data['annotations'].append(box_only)
    path = tmp_path / 'with_box_only.json'
    path.write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco.COCO(str(path))
    dets = [_perfect_detections(coco_gt, i) for i in (1, 2)]
    # A detection with a full-box mask on the box-only object of image 3.
    dets.append([(np.array([20, 20, 50, 50], np.float32), LABEL_OF[42], 0.95,
                  np.ones((MASK_SIZE, MASK_SIZE), np.float32))])
    with_it = _evaluate(str(path), [_make_batch(dets[:2], [1, 2]), _make_batch(dets[2:], [3])])
    without = _evaluate(str(path), [_make_batch(dets[:2], [1, 2]), _make_batch([[]], [3])])
    # Boxes: the box-only object is a real object, found by the detection.
    assert with_it['box_AP50'] == pytest.approx(100.0)
    assert without['box_AP50'] < 100.0
    # Masks: it is ignored, neither a hit nor a false positive.
    assert with_it['mask_AP50'] == pytest.approx(without['mask_AP50'])
    assert with_it['mask_AP50'] == pytest.approx(100.0)


def test_per_category_ap_averages_to_the_overall_ap(tmp_path):
    """Category 5 has no ground truth: its AP is NaN and, as in COCOeval's own
    average, it does not count; the others' mean is the overall AP."""
    data = _ground_truth()
    data['categories'].append({'id': 5, 'name': 'cat5'})
    path = tmp_path / 'with_empty_category.json'
    path.write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco.COCO(str(path))
    category_ids = CATEGORY_IDS + (5,)
    dets = [_perfect_detections(coco_gt, i) for i in (1, 2)]
    # Category 0 of image 2: a box shifted by half its width (IoU 1/3), and a
    # false positive of category 5 on image 1.
    box, label, _, mask = next(d for d in dets[1] if d[1] == LABEL_OF[0])
    dets[1].append((box + np.array([10, 0, 10, 0], np.float32), label, 0.95, mask))
    dets[0].append((np.array([70, 60, 90, 80], np.float32), 4, 0.99,
                    np.ones((MASK_SIZE, MASK_SIZE), np.float32)))
    evaluator = evaluation.CocoEvaluator(str(path), category_ids)
    evaluator.add_batch(*_make_batch(dets, [1, 2]))
    metrics = evaluator.compute_metrics()
    for prefix in ('box', 'mask'):
        per_category = evaluator.per_category[prefix]
        assert sorted(per_category) == [0, 5, 7, 42]
        assert np.isnan(per_category[5])
        finite = [v for v in per_category.values() if np.isfinite(v)]
        assert np.mean(finite) == pytest.approx(metrics[f'{prefix}_AP'], abs=1e-9)
    # Not all equal: the shifted duplicate costs category 0 only.
    assert evaluator.per_category['box'][0] < 90.0
    assert evaluator.per_category['box'][42] == pytest.approx(100.0)
    assert evaluator.per_category['box'][7] == pytest.approx(100.0)


def test_per_category_ap_without_detections(gt):
    path, _ = gt
    evaluator = evaluation.CocoEvaluator(path, CATEGORY_IDS)
    evaluator.add_batch(*_make_batch([[]], [2]))
    evaluator.compute_metrics()
    # Image 2 holds categories 7 and 0 only.
    box = evaluator.per_category['box']
    assert box[7] == 0.0 and box[0] == 0.0 and np.isnan(box[42])


def test_boxes_are_mapped_back_per_axis_from_the_resized_size(gt, tmp_path):
    # A 100x120 image resized to 213x256 (a floor rule): y scales by 2.13, x by 2.1333.
    box = np.array([10., 20., 60., 80.], np.float32)
    preds, batch = _make_batch([[(box, 1, 0.9, np.ones((MASK_SIZE, MASK_SIZE)))]], [1])
    batch['image_size'] = np.array([[213, 256]], np.int32)
    batch['image_scale'] = np.array([2.13], np.float32)   # the one-scale answer would differ in x
    preds['detection_boxes'][0, 0] = box * np.array([256 / 120, 213 / 100, 256 / 120, 213 / 100])
    _evaluate(gt[0], [(preds, batch)], output_dir=str(tmp_path))
    result = json.loads((tmp_path / evaluation.RESULTS_FILENAME).read_text())[0]
    np.testing.assert_allclose(result['bbox'], [10., 20., 50., 60.], atol=1e-4)
