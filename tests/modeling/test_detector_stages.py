"""Tests for the detector's stage methods and the reference-convention options
that reach it (proposal and detection size rules, batch-norm epsilon)."""

import jax
import jax.numpy as jnp
import numpy as np

from projects.maskrcnn.modeling import layers, specs
from projects.maskrcnn.modeling.backbones import resnet
from projects.maskrcnn.modeling.backbones.resnet import ResNet
from projects.maskrcnn.modeling.detector import MaskRCNN, generate_proposals
from projects.maskrcnn.modeling.necks import fpn
from tests.variables import fill_variables

# One level, three anchors; the image is 20 x 12 (h, w).
_ANCHORS = np.array([[0, 0, 10, 10], [11, 0, 13, 8], [4, 4, 9, 9]], np.float32)
_LOGITS = [jnp.array([[3.0, 2.0, 1.0]])]
_DELTAS = [jnp.zeros((1, 3, 4))]


def _proposals(**spec):
    fn = jax.jit(lambda l, d: generate_proposals(
        l, d, [_ANCHORS], jnp.array([[20.0, 12.0]]),
        specs.RPNSpec(pre_nms_topk_test=3, post_nms_topk_test=3, **spec), False,
        with_scores=True))
    return jax.tree_util.tree_map(np.asarray, fn(_LOGITS, _DELTAS))


def test_proposal_min_size_inclusive_keeps_boxes_at_the_bound():
    # Anchor 1 is clipped to x1 = 12: 1 px wide; anchor 2 is 5 x 5.
    _, strict, _ = _proposals(min_box_size=1.0)
    _, inclusive, logits = _proposals(min_box_size=1.0, min_box_size_inclusive=True)
    np.testing.assert_array_equal(strict[0], [True, True, False])
    np.testing.assert_array_equal(inclusive[0], [True, True, True])
    np.testing.assert_array_equal(logits[0], [3.0, 2.0, 1.0])
    _, big, logits = _proposals(min_box_size=5.0, min_box_size_inclusive=True)
    np.testing.assert_array_equal(big[0], [True, True, False])  # only the 10x10 and 5x5 ...
    # ... the sorted valid ones first: 10x10 (3.0), 5x5 (1.0), then the 1-px box.
    np.testing.assert_array_equal(logits[0], [3.0, 1.0, -np.inf])


def test_frozen_bn_epsilon_comes_from_the_spec():
    x = jnp.ones((1, 2, 2, 1))
    variables = {'frozen': {'scale': jnp.ones(1), 'bias': jnp.zeros(1), 'mean': jnp.zeros(1),
                            'var': jnp.full((1,), 3.0)}}
    norm = layers.make_norm('frozen_bn', False, jnp.float32, 'n', eps=1.0)
    np.testing.assert_allclose(norm.apply(variables, x), 0.5)
    # A huge epsilon scales every norm of the trunk to ~0: the output no longer
    # depends on the image, which shows that the epsilon reached all of them.
    net = lambda eps: ResNet(depth=18, width=4, norm='frozen_bn', norm_eps=eps)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    v = net(1e-5).init(jax.random.PRNGKey(0), images)
    v = {**v, 'frozen': jax.tree_util.tree_map(lambda a: a + 0.1, v['frozen'])}
    small, huge = (net(e).apply(v, images)['c5'] for e in (1e-5, 1e12))
    assert np.abs(small[0] - small[1]).max() > 1e-3
    np.testing.assert_allclose(huge[0], huge[1], atol=1e-6)


TINY = dict(num_classes=3, backbone=resnet.ResNetSpec(depth=18, width=8, norm='gn'),
            neck_spec=fpn.FPNSpec(channels=16),
            rpn=specs.RPNSpec(pre_nms_topk_test=100, post_nms_topk_test=50),
            box_head=specs.BoxHeadSpec(fc_dim=32),
            mask_head=specs.MaskHeadSpec(conv_dim=16, num_convs=1))
IMAGES = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 64, 3)), jnp.float32)
SIZES = jnp.array([[64, 56]], jnp.int32)


def _stages(module, images, sizes):
    _, features = module.extract_features(images)
    rpn = module.propose(features, sizes)
    det = module.detect(features, rpn['proposals'], rpn['proposals_valid'], sizes)
    det['detection_masks'] = module.predict_masks(features, det['detection_boxes'],
                                                  det['detection_classes'])
    return det


def test_stages_compose_to_the_detector_and_the_test_size_rule_applies():
    model = MaskRCNN(**TINY, test=specs.TestSpec(score_threshold=0.0, detections_per_image=20))
    variables = fill_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), IMAGES, SIZES))
    whole = jax.jit(lambda v: model.apply(v, IMAGES, SIZES))(variables)
    staged = jax.jit(lambda v: model.apply(v, IMAGES, SIZES, method=_stages))(variables)
    assert set(whole) == set(staged)
    for key in whole:
        np.testing.assert_array_equal(whole[key], staged[key], err_msg=key)
    valid = np.asarray(whole['detection_valid'][0])
    assert valid.sum() >= 10
    boxes = np.asarray(whole['detection_boxes'][0])[valid]
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    # A bound between the detections' sides drops the smaller ones (others,
    # big enough, may take their places).
    bound = float(np.median(side))
    picky = MaskRCNN(**TINY, test=specs.TestSpec(score_threshold=0.0, detections_per_image=20,
                                                 min_box_size=bound,
                                                 min_box_size_inclusive=True))
    kept = jax.jit(lambda v: picky.apply(v, IMAGES, SIZES))(variables)
    kept_boxes = np.asarray(kept['detection_boxes'][0])[np.asarray(kept['detection_valid'][0])]
    assert len(kept_boxes) > 0
    assert np.all(np.minimum(kept_boxes[:, 2] - kept_boxes[:, 0],
                             kept_boxes[:, 3] - kept_boxes[:, 1]) >= bound)
    for small in boxes[side < bound]:
        assert not np.any(np.all(kept_boxes == small, axis=1))
