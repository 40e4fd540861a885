"""Mask R-CNN: backbone + neck + RPN + RoIAlign + box head + mask head.

The backbone and the neck are the parts the config names (registry.py); the
neck gives the pyramid [P2, P3, ...] of strides 4, 8, ... that the rest reads.

Shape shorthand (see CONVENTIONS.md): B images, L pyramid levels, A anchors per
image, S sampled anchors, P proposals, R sampled RoIs, F mask slots, D detections,
K foreground classes. Naming: `pred_*` network outputs, `gt_*` ground truth,
`matched_*` ground truth gathered per anchor or RoI.

In training the module also assigns targets (it must: RoIs are sampled from its
own proposals), and returns predictions next to their targets for losses.py.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from projects.maskrcnn.modeling import registry, specs
from projects.maskrcnn.modeling.heads.bbox_head import BoxHead
from projects.maskrcnn.modeling.heads.mask_head import MaskHead
from projects.maskrcnn.modeling.heads.rpn import RPNHead
from projects.maskrcnn.ops import anchors as anchor_ops
from projects.maskrcnn.ops import boxes as box_ops
from projects.maskrcnn.ops import nms as nms_ops
from projects.maskrcnn.ops import roi_align
from projects.maskrcnn.ops import targets as target_ops

MIN_LEVEL = 2  # P2 has stride 4.


def _pad_last(x, size, value):
    pad = size - x.shape[-1]
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)],
                                      constant_values=value)


def generate_proposals(logits: list[jnp.ndarray], deltas: list[jnp.ndarray],
                       anchors: list[np.ndarray], image_sizes: jnp.ndarray,
                       spec: specs.RPNSpec, train: bool, with_scores: bool = False):
    """Per-level top-k, decode, clip, per-level NMS, then top-k per image.

    Follows Detectron2's find_top_rpn_proposals (and torchvision's
    filter_proposals, which differs only in the small-box rule of `spec`), with
    every level's NMS batched into one call. Scores are logits. torchvision
    ranks by sigmoid(logit) instead, whose float32 values tie for close or
    large logits; its NMS breaks ties by index, which within a level is
    descending-logit order, so per-level NMS keeps the same boxes; only the
    order of tied proposals across levels (and so which of them make the
    post-NMS cut) can differ.

    Args:
      logits: L arrays [B, A_l]. deltas: L arrays [B, A_l, 4].
      anchors: L arrays [A_l, 4]. image_sizes: [B, 2] (h, w) before padding.
      with_scores: also return the proposals' objectness logits.

    Returns:
      proposals [B, P, 4] sorted by score, their validity [B, P] (and with
      `with_scores` their logits [B, P], -inf where not valid).
    """
    pre_k = spec.pre_nms_topk_train if train else spec.pre_nms_topk_test
    post_k = spec.post_nms_topk_train if train else spec.post_nms_topk_test
    ks = [min(pre_k, a.shape[0]) for a in anchors]
    k_max = max(ks)
    level_boxes, level_scores, level_valid = [], [], []
    for logit, delta, anchor, k in zip(logits, deltas, anchors, ks):
        scores, idx = jax.lax.top_k(logit, k)                       # [B, k]
        boxes = box_ops.decode_boxes(jnp.take_along_axis(delta, idx[..., None], axis=1),
                                     jnp.asarray(anchor)[idx], spec.box_weights)
        boxes = box_ops.clip_boxes(boxes, image_sizes[:, None, :])
        valid = box_ops.has_min_size(boxes, spec.min_box_size, spec.min_box_size_inclusive)
        valid = valid & jnp.isfinite(scores)
        level_boxes.append(jnp.pad(boxes, ((0, 0), (0, k_max - k), (0, 0))))
        level_scores.append(_pad_last(scores, k_max, -jnp.inf))
        level_valid.append(_pad_last(valid, k_max, False))
    boxes = jnp.stack(level_boxes, 1)    # [B, L, k_max, 4]
    scores = jnp.stack(level_scores, 1)
    valid = jnp.stack(level_valid, 1)
    nms = jax.vmap(jax.vmap(lambda b, s, v: nms_ops.nms_mask(b, s, v, spec.nms_threshold)))
    keep = nms(boxes, scores, valid)
    b = boxes.shape[0]
    flat_scores = jnp.where(keep, scores, -jnp.inf).reshape(b, -1)
    k = min(post_k, flat_scores.shape[1])
    top_scores, top_idx = jax.lax.top_k(flat_scores, k)
    proposals = jax.lax.stop_gradient(
        jnp.take_along_axis(boxes.reshape(b, -1, 4), top_idx[..., None], axis=1))
    if with_scores:
        return proposals, jnp.isfinite(top_scores), jax.lax.stop_gradient(top_scores)
    return proposals, jnp.isfinite(top_scores)


class MaskRCNN(registry.Parts):
    """The detector. `num_classes` counts foreground classes only.

    The keyword-only fields `backbone` and `neck_spec` (registry.Parts) hold the
    specs of the registered backbone and neck; the other fields the heads' specs.
    Besides `__call__`, the stages are methods (`extract_features`, `propose`,
    `pool`, `detect`, `predict_masks`) that `apply(..., method=...)` can run
    one by one, e.g. to compare each with a reference implementation.
    """
    num_classes: int
    anchors: specs.AnchorSpec = specs.AnchorSpec()
    rpn: specs.RPNSpec = specs.RPNSpec()
    roi_heads: specs.ROIHeadsSpec = specs.ROIHeadsSpec()
    box_head: specs.BoxHeadSpec = specs.BoxHeadSpec()
    mask_head: specs.MaskHeadSpec = specs.MaskHeadSpec()
    test: specs.TestSpec = specs.TestSpec()
    dtype: Any = jnp.float32

    def setup(self):
        self.body, self.neck, self.feature_maps = self.build_parts(self.dtype)
        self.rpn_head = RPNHead(len(self.anchors.sizes[0]) * len(self.anchors.aspect_ratios),
                                self.rpn.num_convs, dtype=self.dtype)
        b = self.box_head
        self.box_predictor = BoxHead(self.num_classes, b.fc_dim, b.num_fc, b.class_agnostic,
                                     b.num_convs, b.conv_dim, b.norm, dtype=self.dtype)
        m = self.mask_head
        self.mask_predictor = MaskHead(self.num_classes, m.conv_dim, m.num_convs,
                                       m.upsample, m.norm, m.class_agnostic, dtype=self.dtype)

    def __call__(self, images: jnp.ndarray, image_sizes: jnp.ndarray,
                 gt: dict[str, jnp.ndarray] | None = None, train: bool = False
                 ) -> dict[str, jnp.ndarray]:
        """Runs the detector.

        Args:
          images: [B, H, W, 3] normalised, padded images.
          image_sizes: [B, 2] (h, w) of the images before padding.
          gt: with `train`, the batch's `gt_boxes`, `gt_classes`, `gt_valid`, `gt_masks`
            and optionally `gt_has_mask`.
          train: training mode (targets, sampling, batch-norm updates).

        Returns:
          In training, predictions with their targets (keys `rpn_*`, `roi_*`,
          `mask_*`, see `_train_outputs`); otherwise detections: `detection_boxes`
          [B, D, 4], `detection_scores` [B, D], `detection_classes` [B, D] (1..K),
          `detection_valid` [B, D] and `detection_masks` [B, D, 28, 28] probabilities.
        """
        _, features = self.extract_features(images, train)
        image_sizes = image_sizes.astype(jnp.float32)
        rpn = self.propose(features, image_sizes, train)
        if train:
            return self._train_outputs(features[:4], _strides(4), rpn['logits'],
                                       rpn['deltas'], rpn['anchors'], rpn['proposals'],
                                       rpn['proposals_valid'], gt)
        detections = self.detect(features, rpn['proposals'], rpn['proposals_valid'],
                                 image_sizes)
        detections['detection_masks'] = self.predict_masks(
            features, detections['detection_boxes'], detections['detection_classes'])
        return detections

    def extract_features(self, images: jnp.ndarray, train: bool = False
                         ) -> tuple[dict[str, jnp.ndarray], list[jnp.ndarray]]:
        """Backbone and neck: ({name: map} as the backbone declares, [P2, ..., P6]), NHWC."""
        backbone = self.body(images, train=train)
        _check_maps(backbone, self.feature_maps, images.shape[1:3])
        features = self.neck(backbone, train=train)
        if len(features) != len(self.anchors.sizes):
            raise ValueError(f'model.anchors.sizes has {len(self.anchors.sizes)} levels '
                             f'but the neck gives {len(features)}')
        for level, (stride, f) in enumerate(zip(_strides(len(features)), features)):
            if f.shape[1:3] not in _sizes(images.shape[1:3], stride):
                raise ValueError(f'the neck\'s level {level} is {f.shape[1:3]} for images '
                                 f'{images.shape[1:3]}; level i must have stride 2 ** (i + 2)')
        return backbone, features

    def propose(self, features: list[jnp.ndarray], image_sizes: jnp.ndarray,
                train: bool = False) -> dict[str, Any]:
        """RPN head, anchors and proposals.

        Returns:
          dict with `logits` (L arrays [B, A_l]), `deltas` (L arrays [B, A_l, 4]),
          `anchors` (L numpy arrays [A_l, 4]), `proposals` [B, P, 4],
          `proposals_valid` [B, P] and `proposal_logits` [B, P].
        """
        a = self.anchors
        anchors = anchor_ops.pyramid_anchors(
            [f.shape[1:3] for f in features], _strides(len(features)), a.sizes,
            a.aspect_ratios, a.offset, a.round_cell_anchors, a.order)
        logits, deltas = self.rpn_head(features)
        proposals, valid, scores = generate_proposals(
            logits, deltas, anchors, image_sizes.astype(jnp.float32), self.rpn, train,
            with_scores=True)
        return {'logits': logits, 'deltas': deltas, 'anchors': anchors,
                'proposals': proposals, 'proposals_valid': valid, 'proposal_logits': scores}

    def pool(self, features: list[jnp.ndarray], boxes: jnp.ndarray, resolution: int,
             train: bool = False) -> jnp.ndarray:
        """RoIAlign of [B, R, 4] boxes from P2..P5: [B, R, S, S, C]. `train`:
        the result will be differentiated (it steers roi_align_impl='auto')."""
        return self._pool(features[:4], _strides(4), boxes, resolution, train)

    def _pool(self, features, strides, boxes, resolution, train=True):
        r = self.roi_heads
        fn = lambda feats, b: roi_align.multilevel_roi_align(
            feats, strides, b, resolution, r.sampling_ratio, r.aligned, MIN_LEVEL,
            r.canonical_size, r.canonical_level, r.level_rule, r.adaptive_sampling_cap,
            r.roi_align_impl, with_gradient=train)
        return jax.vmap(fn)(features, boxes)

    def _mask_logits(self, roi_features: jnp.ndarray, train: bool) -> jnp.ndarray:
        """The mask head on [B, R, S, S, C] RoI features, all B * R RoIs as one batch
        (each RoI's logits depend on it alone)."""
        b, r = roi_features.shape[:2]
        logits = self.mask_predictor(roi_features.reshape(b * r, *roi_features.shape[2:]),
                                     train=train)
        return logits.reshape(b, r, *logits.shape[1:])

    def _class_channel(self, per_class, classes):
        """Picks each RoI's class from [..., K or 1, ...]-shaped predictions."""
        if per_class.shape[-1 if per_class.ndim == 5 else -2] == 1:
            classes = jnp.ones_like(classes)
        idx = jnp.maximum(classes - 1, 0)
        if per_class.ndim == 5:  # masks [B, F, M, M, K]
            return jnp.take_along_axis(per_class, idx[:, :, None, None, None], axis=-1)[..., 0]
        return jnp.take_along_axis(per_class, idx[:, :, None, None], axis=-2)[..., 0, :]

    def _train_outputs(self, features, strides, logits, deltas, anchors,
                       proposals, proposals_valid, gt):
        b = proposals.shape[0]
        rpn_rng, roi_rng = jax.random.split(self.make_rng('sampling'))
        all_anchors = jnp.asarray(np.concatenate(anchors, 0))
        rpn = jax.vmap(lambda key, boxes, valid: target_ops.rpn_targets(
            key, all_anchors, boxes, valid, iou_thresholds=self.rpn.iou_thresholds,
            batch_size_per_image=self.rpn.batch_size_per_image,
            positive_fraction=self.rpn.positive_fraction,
            box_weights=self.rpn.box_weights))(
                jax.random.split(rpn_rng, b), gt['gt_boxes'], gt['gt_valid'])
        all_logits = jnp.concatenate(logits, 1)
        all_deltas = jnp.concatenate(deltas, 1)
        r = self.roi_heads
        roi = jax.vmap(lambda key, p, pv, gb, gc, gv: target_ops.roi_targets(
            key, p, pv, gb, gc, gv, fg_iou_threshold=r.fg_iou_threshold,
            bg_iou_low=r.bg_iou_low, batch_size_per_image=r.batch_size_per_image,
            positive_fraction=r.positive_fraction, append_gt_boxes=r.append_gt_boxes))(
                jax.random.split(roi_rng, b), proposals, proposals_valid,
                gt['gt_boxes'], gt['gt_classes'], gt['gt_valid'])
        roi = jax.tree_util.tree_map(jax.lax.stop_gradient, roi)
        cls_logits, box_deltas = self.box_predictor(
            self._pool(features, strides, roi['boxes'], r.box_resolution), train=True)
        matched_boxes = jnp.take_along_axis(gt['gt_boxes'], roi['matched_gt'][..., None], 1)
        box_targets = box_ops.encode_boxes(matched_boxes, roi['boxes'],
                                           self.box_head.box_weights)

        fg_idx, fg_valid = jax.vmap(
            lambda t: target_ops.select_foreground(t, self.mask_head.num_fg_slots))(roi)
        take = lambda x: jnp.take_along_axis(x, fg_idx.reshape(fg_idx.shape + (1,) * (x.ndim - 2)), 1)
        fg_boxes, fg_classes, fg_matched = take(roi['boxes']), take(roi['classes']), take(roi['matched_gt'])
        mask_logits = self._mask_logits(
            self._pool(features, strides, fg_boxes, r.mask_resolution), train=True)
        mask_size = mask_logits.shape[2]
        mask_targets = jax.vmap(lambda m, gb, mi, rb: target_ops.mask_targets(
            m, gb, mi, rb, mask_size, self.mask_head.targets))(
                gt['gt_masks'], gt['gt_boxes'], fg_matched, fg_boxes)
        if 'gt_has_mask' in gt:  # box-only annotations give no mask target
            fg_valid = fg_valid & jnp.take_along_axis(gt['gt_has_mask'], fg_matched, axis=1)
        return {
            'rpn_logits': jnp.take_along_axis(all_logits, rpn['indices'], 1),
            'rpn_deltas': jnp.take_along_axis(all_deltas, rpn['indices'][..., None], 1),
            'rpn_labels': rpn['labels'], 'rpn_weights': rpn['weights'],
            'rpn_is_positive': rpn['is_positive'], 'rpn_box_targets': rpn['box_targets'],
            'roi_cls_logits': cls_logits, 'roi_classes': roi['classes'],
            'roi_valid': roi['valid'], 'roi_is_positive': roi['is_positive'],
            'roi_box_deltas': self._class_channel(box_deltas, roi['classes']),
            'roi_box_targets': jax.lax.stop_gradient(box_targets),
            'mask_logits': self._class_channel(mask_logits, fg_classes),
            'mask_targets': jax.lax.stop_gradient(mask_targets), 'mask_valid': fg_valid,
            'num_proposals': proposals_valid.sum(-1).astype(jnp.float32),
        }

    def detect(self, features: list[jnp.ndarray], proposals: jnp.ndarray,
               proposals_valid: jnp.ndarray, image_sizes: jnp.ndarray
               ) -> dict[str, jnp.ndarray]:
        """Box head and postprocessing: score threshold, small-box removal,
        per-class NMS, the top `detections_per_image` (torchvision's
        postprocess_detections; Detectron2's fast_rcnn_inference).

        Returns:
          `detection_boxes` [B, D, 4], `detection_scores` [B, D] (0 where not
          valid), `detection_classes` [B, D] in 1..K (0 where not valid),
          `detection_valid` [B, D].
        """
        t = self.test
        cls_logits, box_deltas = self.box_predictor(
            self.pool(features, proposals, self.roi_heads.box_resolution))
        scores = jax.nn.softmax(cls_logits, axis=-1)[..., 1:]               # [B, P, K]
        boxes = box_ops.decode_boxes(box_deltas, proposals[:, :, None, :],
                                     self.box_head.box_weights)            # [B, P, K|1, 4]
        boxes = box_ops.clip_boxes(boxes, image_sizes.astype(jnp.float32)[:, None, None, :])
        boxes = jnp.broadcast_to(boxes, scores.shape + (4,))
        big_enough = box_ops.has_min_size(boxes, t.min_box_size, t.min_box_size_inclusive)
        valid = (scores > t.score_threshold) & proposals_valid[..., None] & big_enough
        # One NMS per (image, class), all in one batched call.
        to_class_major = lambda x: jnp.moveaxis(x, 2, 1)
        nms = jax.vmap(jax.vmap(lambda b, s, v: nms_ops.nms_mask(b, s, v, t.nms_threshold)))
        keep = nms(to_class_major(boxes), to_class_major(scores), to_class_major(valid))
        b = scores.shape[0]
        flat_scores = jnp.where(keep, to_class_major(scores), -jnp.inf).reshape(b, -1)
        num_det = min(t.detections_per_image, flat_scores.shape[1])
        det_scores, det_idx = jax.lax.top_k(flat_scores, num_det)
        det_boxes = jnp.take_along_axis(to_class_major(boxes).reshape(b, -1, 4),
                                        det_idx[..., None], 1)
        det_classes = (det_idx // proposals.shape[1] + 1).astype(jnp.int32)
        det_valid = jnp.isfinite(det_scores)
        return {
            'detection_boxes': det_boxes,
            'detection_scores': jnp.where(det_valid, det_scores, 0.0),
            'detection_classes': jnp.where(det_valid, det_classes, 0),
            'detection_valid': det_valid,
        }

    def predict_masks(self, features: list[jnp.ndarray], boxes: jnp.ndarray,
                      classes: jnp.ndarray) -> jnp.ndarray:
        """Mask probabilities [B, D, M, M] of [B, D, 4] boxes, each in its class
        channel (classes in 1..K; 0, for padding, reads class 1)."""
        mask_logits = self._mask_logits(
            self.pool(features, boxes, self.roi_heads.mask_resolution), train=False)
        return jax.nn.sigmoid(self._class_channel(mask_logits, classes))


def _check_maps(maps: dict[str, jnp.ndarray], declared: tuple[registry.FeatureMap, ...],
                image_hw: tuple[int, int]) -> None:
    """Raises if the backbone's maps are not the ones it declared (names, strides, channels)."""
    if set(maps) != {m.name for m in declared}:
        raise ValueError(f'the backbone declares maps {sorted(m.name for m in declared)} '
                         f'but returns {sorted(maps)}')
    for m in declared:
        shape = maps[m.name].shape
        if shape[1:3] not in _sizes(image_hw, m.stride) or shape[3] != m.channels:
            raise ValueError(f'backbone map {m.name!r} is {shape[1:]} for images {image_hw}; '
                             f'it declares stride {m.stride} and {m.channels} channels')


def _sizes(image_hw: tuple[int, int], stride: int) -> tuple[tuple[int, int], ...]:
    """The map sizes a stride gives: the image size divided by it, rounded up or down."""
    return (tuple(-(-s // stride) for s in image_hw), tuple(s // stride for s in image_hw))


def _strides(num_levels: int) -> list[int]:
    return [2 ** (MIN_LEVEL + i) for i in range(num_levels)]
