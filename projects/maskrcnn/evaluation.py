"""COCO box and mask AP of Mask R-CNN detections, computed with pycocotools.

The evaluator collects detections batch by batch on the host, converts them to
the COCO results format in original-image pixels and runs `COCOeval` once at
the end. Batches follow CONVENTIONS.md: boxes are xyxy in resized-image pixels,
labels are contiguous 1..K and label k is the dataset's `category_ids[k - 1]`.
"""

import contextlib
import copy
import io
import json
import os
from typing import Any
from collections.abc import Sequence

from absl import logging
import numpy as np
from pycocotools import coco
from pycocotools import cocoeval
from pycocotools import mask as mask_utils

from projects.maskrcnn.ops import mask_paste

# Order of COCOeval.stats[0:6].
_STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
RESULTS_FILENAME = 'coco_results.json'


def metric_names(with_masks: bool = True) -> list[str]:
    """Keys returned by `CocoEvaluator.compute_metrics`."""
    prefixes = ('box', 'mask') if with_masks else ('box',)
    return [f'{prefix}_{stat}' for prefix in prefixes for stat in _STAT_NAMES]


@contextlib.contextmanager
def _stdout_to_log():
    """Sends what pycocotools prints to absl logging at INFO instead of stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logging.info('pycocotools:\n%s', buffer.getvalue().rstrip())


def image_detections_to_coco(
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None,
    image_id: int,
    orig_size: tuple[int, int],
    image_scale: float | tuple[float, float],
    category_ids: np.ndarray,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Converts the valid detections of one image to COCO result dicts.

    Args:
      boxes_xyxy: [D, 4] boxes in resized-image pixels.
      scores: [D] detection scores.
      labels: [D] contiguous labels in 1..K.
      masks: [D, m, m] mask probabilities in box coordinates, or None.
      image_id: the dataset's image id.
      orig_size: (height, width) of the original image.
      image_scale: resized / original size: one scale, or (height, width) scales
        to map each axis back by its own ratio.
      category_ids: [K] the dataset's category id of each label.
      mask_threshold: probability at or above which a pixel is in the mask.

    Returns:
      One dict per detection with `image_id`, `category_id`, `score`, `bbox`
      (xywh, original-image pixels, clipped to the image) and, with masks,
      `segmentation` (compressed RLE with `counts` as str).
    """
    if labels.size and (labels.min() < 1 or labels.max() > len(category_ids)):
        raise ValueError(f'Labels must lie in 1..{len(category_ids)}, got '
                         f'{labels.min()}..{labels.max()}.')
    height, width = int(orig_size[0]), int(orig_size[1])
    scale_y, scale_x = np.broadcast_to(np.asarray(image_scale, np.float64), (2,))
    boxes = boxes_xyxy.astype(np.float64) / np.asarray([scale_x, scale_y, scale_x, scale_y])
    # The masks live in the predicted boxes, so they are pasted into the
    # unclipped boxes; only the reported boxes are clipped.
    clipped = np.clip(boxes, 0.0, [width, height, width, height])
    sizes = np.maximum(clipped[:, 2:] - clipped[:, :2], 0.0)
    boxes_xywh = np.concatenate([clipped[:, :2], sizes], axis=1)
    rles = [None] * len(boxes)
    if masks is not None and len(boxes):
        pasted = mask_paste.paste_masks(masks, boxes, height, width,
                                        threshold=mask_threshold)
        # encode() wants a Fortran-ordered uint8 [height, width, D] array.
        rles = mask_utils.encode(
            np.asfortranarray(pasted.transpose(1, 2, 0).astype(np.uint8)))
    results = []
    for box, score, label, rle in zip(boxes_xywh, scores, labels, rles):
        result = {
            'image_id': int(image_id),
            'category_id': int(category_ids[label - 1]),
            'bbox': [float(v) for v in box],
            'score': float(score),
        }
        if rle is not None:
            result['segmentation'] = {
                'size': [int(s) for s in rle['size']],
                'counts': rle['counts'].decode('ascii'),
            }
        results.append(result)
    return results


def per_category_ap(evaluator: cocoeval.COCOeval) -> dict[int, float]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of each category of an
    accumulated COCOeval, in percent; NaN for a category without ground truth,
    which COCOeval leaves out of the overall AP as well (follows Detectron2's
    `_derive_coco_results`). The mean of the finite values is stats[0].
    """
    precision = evaluator.eval['precision']  # [IoU T, recall R, K, area A, maxDets M]
    area = evaluator.params.areaRngLbl.index('all')
    max_dets = evaluator.params.maxDets.index(max(evaluator.params.maxDets))
    result = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, area, max_dets]
        values = values[values > -1]
        result[int(category_id)] = 100.0 * float(values.mean()) if values.size else float('nan')
    return result


def _run_cocoeval(coco_gt: coco.COCO, results: list[dict[str, Any]],
                  iou_type: str, image_ids: list[int]) -> tuple[np.ndarray, dict[int, float]]:
    """Runs COCOeval on non-empty `results`; returns stats[0:6] in [0, 1] or -1,
    and `per_category_ap`."""
    # loadRes writes into the dicts, and it takes the area that decides
    # small/medium/large from `bbox` when present: drop it for mask AP so that
    # mask AP uses the mask area (Detectron2 does the same).
    drop = 'bbox' if iou_type == 'segm' else 'segmentation'
    results = [{k: v for k, v in r.items() if k != drop} for r in results]
    with _stdout_to_log():
        coco_dt = coco_gt.loadRes(results)
        evaluator = cocoeval.COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats[:len(_STAT_NAMES)], np.float64), per_category_ap(evaluator)


def _categories_with_ground_truth(coco_gt: coco.COCO, image_ids: list[int]) -> set[int]:
    """Categories with a non-crowd annotation on `image_ids`: those COCOeval scores."""
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_ids))
    return {int(a['category_id']) for a in anns if not a.get('iscrowd', 0)}


class CocoEvaluator:
    """Accumulates detections over batches and computes COCO box and mask AP.

    Usage: `add_batch` for every evaluation batch, then `compute_metrics`, then
    `reset` before the next evaluation.
    """

    def __init__(self,
                 annotations_file: str,
                 category_ids: Sequence[int],
                 output_dir: str | None = None,
                 mask_threshold: float = 0.5):
        """Loads the ground truth once.

        Args:
          annotations_file: COCO-format json with the ground truth.
          category_ids: the dataset's category id of each contiguous label
            1..K (`meta_data['category_ids']`).
          output_dir: where `compute_metrics` writes coco_results.json; None to
            write nothing.
          mask_threshold: probability at or above which a pasted pixel is in
            the mask.
        """
        with _stdout_to_log():
            self._coco_gt = coco.COCO(annotations_file)
        self._category_ids = np.asarray(category_ids, np.int64)
        unknown = set(self._category_ids.tolist()) - set(self._coco_gt.getCatIds())
        if unknown:
            raise ValueError(f'Category ids {sorted(unknown)} are not in '
                             f'{annotations_file}.')
        self._gt_image_ids = set(self._coco_gt.getImgIds())
        self._coco_gt_segm = None  # built on first use by _segm_ground_truth
        self._output_dir = output_dir
        self._mask_threshold = mask_threshold
        self.reset()

    def reset(self) -> None:
        """Forgets all detections added so far."""
        self._results: list[dict[str, Any]] = []
        self._image_ids: set[int] = set()
        # None until the first batch tells whether masks are evaluated.
        self._with_masks: bool | None = None
        self.per_category: dict[str, dict[int, float]] = {}

    @property
    def results(self) -> list[dict[str, Any]]:
        """The detections added so far, in COCO results format."""
        return self._results

    def add_batch(self, predictions: dict[str, Any], batch: dict[str, Any]) -> None:
        """Adds the detections of one batch.

        Args:
          predictions: numpy (or jax) arrays: `detection_boxes` [B, D, 4] xyxy in
            resized-image pixels, `detection_scores` [B, D], `detection_classes`
            [B, D] in 0..K, `detection_valid` [B, D] and optionally
            `detection_masks` [B, D, m, m] mask probabilities in box
            coordinates. Entries with class 0 or valid False are ignored.
          batch: `image_id` [B], `orig_size` [B, 2], `image_scale` [B] and
            `batch_mask` [B]; examples with batch_mask 0 are ignored. With
            `image_size` [B, 2] (the resized size before padding), boxes are
            mapped back per axis (resized / original on each axis), as
            torchvision's and Detectron2's postprocessing do.
        """
        with_masks = predictions.get('detection_masks') is not None
        if self._with_masks is not None and with_masks != self._with_masks:
            raise ValueError('Either every batch or no batch must carry '
                             '`detection_masks`.')
        self._with_masks = with_masks
        boxes = np.asarray(predictions['detection_boxes'])
        scores = np.asarray(predictions['detection_scores'])
        labels = np.asarray(predictions['detection_classes']).astype(np.int64)
        keep = labels > 0
        if predictions.get('detection_valid') is not None:
            keep &= np.asarray(predictions['detection_valid']).astype(bool)
        masks = np.asarray(predictions['detection_masks']) if with_masks else None
        image_ids = np.asarray(batch['image_id'])
        orig_sizes = np.asarray(batch['orig_size'])
        image_scales = np.asarray(batch['image_scale'], np.float64)
        resized = np.asarray(batch['image_size'], np.float64) if 'image_size' in batch else None
        for i in np.flatnonzero(np.asarray(batch['batch_mask']) > 0):
            image_id = int(image_ids[i])
            if image_id not in self._gt_image_ids:
                raise ValueError(f'Image id {image_id} is not in the ground truth.')
            if image_id in self._image_ids:
                logging.warning('Image id %d was added twice; its detections are '
                                'counted twice.', image_id)
            self._image_ids.add(image_id)
            self._results.extend(image_detections_to_coco(
                boxes[i][keep[i]], scores[i][keep[i]], labels[i][keep[i]],
                masks[i][keep[i]] if with_masks else None,
                image_id=image_id,
                orig_size=tuple(orig_sizes[i]),
                image_scale=(float(image_scales[i]) if resized is None
                             else tuple(resized[i] / orig_sizes[i])),
                category_ids=self._category_ids,
                mask_threshold=self._mask_threshold))

    def compute_metrics(self) -> dict[str, float]:
        """Runs COCOeval on the images added since the last `reset`.

        The mask metrics are left out when batches were added without
        `detection_masks` (they are there, as zeros, when none was added).
        COCOeval reports -1 for a size range without ground truth; that is
        reported as 0.0 (NaN or -1 would spoil TensorBoard curves) and logged.

        Also sets `per_category`: {'box': {category_id: AP}, 'mask': ...}
        (see `per_category_ap`; NaN for a category without ground truth).

        Returns:
          {'box_AP', 'box_AP50', 'box_AP75', 'box_APs', 'box_APm', 'box_APl'}
          and the same six with the `mask_` prefix, in percent (0-100). All
          zeros when there are no detections.
        """
        self.per_category = {}
        if self._output_dir:
            self._write_results()
        with_masks = self._with_masks is not False
        metrics = dict.fromkeys(metric_names(with_masks), 0.0)
        image_ids = sorted(self._image_ids)
        iou_types = {'box': 'bbox', 'mask': 'segm'} if with_masks else {'box': 'bbox'}
        if not self._results:
            logging.info('No detections on %d images: all COCO metrics are 0.',
                         len(self._image_ids))
            for prefix, iou_type in iou_types.items():
                gt = self._segm_ground_truth() if iou_type == 'segm' else self._coco_gt
                scored = _categories_with_ground_truth(gt, image_ids)
                self.per_category[prefix] = {
                    int(c): 0.0 if c in scored else float('nan') for c in gt.getCatIds()}
            return metrics
        for prefix, iou_type in iou_types.items():
            gt = self._segm_ground_truth() if iou_type == 'segm' else self._coco_gt
            stats, self.per_category[prefix] = _run_cocoeval(
                gt, self._results, iou_type, image_ids)
            for name, value in zip(_STAT_NAMES, stats):
                if value < 0:
                    logging.info('%s_%s: no ground truth in this size range; '
                                 'reported as 0.', prefix, name)
                metrics[f'{prefix}_{name}'] = 100.0 * max(float(value), 0.0)
        logging.info('COCO metrics on %d images: %s', len(image_ids), metrics)
        return metrics

    def _segm_ground_truth(self) -> coco.COCO:
        """The ground truth for mask AP: box-only annotations (no or empty
        `segmentation`) become crowd regions covering their box, so a mask
        predicted on them is ignored rather than counted as a false positive."""
        if self._coco_gt_segm is None:
            dataset = copy.deepcopy(self._coco_gt.dataset)
            box_only = 0
            for ann in dataset.get('annotations', []):
                if not ann.get('segmentation'):
                    x, y, w, h = ann['bbox']
                    ann['segmentation'] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                    ann['iscrowd'] = 1
                    box_only += 1
            if box_only:
                logging.info('Mask AP ignores %d box-only ground-truth annotations.', box_only)
            self._coco_gt_segm = coco.COCO()
            self._coco_gt_segm.dataset = dataset
            with _stdout_to_log():
                self._coco_gt_segm.createIndex()
        return self._coco_gt_segm

    def _write_results(self) -> None:
        os.makedirs(self._output_dir, exist_ok=True)
        path = os.path.join(self._output_dir, RESULTS_FILENAME)
        with open(path, 'w') as f:
            json.dump(self._results, f)
        logging.info('Wrote %d detections to %s.', len(self._results), path)
