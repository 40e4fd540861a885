"""Tests for ops/boxes.py: IoU, encode/decode, clamping and clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.ops import boxes as box_ops

# Jitted once per signature: one compile is cheaper on CPU than eager dispatch.
pairwise_iou = jax.jit(box_ops.pairwise_iou)
encode = jax.jit(box_ops.encode_boxes, static_argnums=2)
decode = jax.jit(box_ops.decode_boxes, static_argnums=(2, 3))
clip = jax.jit(box_ops.clip_boxes)


def _iou_reference(a, b):
    """Slow float64 IoU of two xyxy boxes; 0 when the union is empty."""
    area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng, n, max_xy=100.0, min_size=1.0, max_size=50.0):
    xy = rng.uniform(0, max_xy, (n, 2))
    wh = rng.uniform(min_size, max_size, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------
# box_area / pairwise_iou
# ----------------------------------------------------------------------------

def test_box_area_hand_cases():
    boxes = jnp.array([[0, 0, 10, 5], [2, 2, 2, 8], [5, 5, 1, 1]], jnp.float32)
    np.testing.assert_array_equal(box_ops.box_area(boxes), [50.0, 0.0, 0.0])


def test_pairwise_iou_hand_cases():
    a = jnp.array([[0, 0, 10, 10]], jnp.float32)
    b = jnp.array([
        [5, 5, 15, 15],     # overlap 5x5 = 25, union 100 + 100 - 25 = 175
        [20, 20, 30, 30],   # disjoint
        [10, 0, 20, 10],    # touching edge: zero-width intersection
        [2, 2, 4, 4],       # contained: 4 / 100
        [0, 0, 10, 10],     # identical
        [-5, 0, 5, 20],     # overlap 5x10 = 50, union 100 + 200 - 50 = 250
    ], jnp.float32)
    iou = pairwise_iou(a, b)
    assert iou.shape == (1, 6)
    np.testing.assert_allclose(iou[0], [25 / 175, 0.0, 0.0, 0.04, 1.0, 0.2], rtol=1e-6)


def test_pairwise_iou_is_symmetric_with_shape_n_by_m():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 5), _random_boxes(rng, 3)
    iou_ab = pairwise_iou(jnp.asarray(a), jnp.asarray(b))
    iou_ba = pairwise_iou(jnp.asarray(b), jnp.asarray(a))
    assert iou_ab.shape == (5, 3)
    np.testing.assert_allclose(iou_ab, np.asarray(iou_ba).T, rtol=1e-6)


def test_pairwise_iou_degenerate_boxes_give_zero_not_nan():
    a = jnp.array([[3, 3, 3, 3],       # a point
                   [0, 0, 0, 10],      # zero width
                   [10, 10, 0, 0],     # flipped (negative size)
                   [0, 0, 10, 10]], jnp.float32)
    iou = np.asarray(pairwise_iou(a, a))
    assert np.all(np.isfinite(iou))
    expected = np.zeros((4, 4), np.float32)
    expected[3, 3] = 1.0  # only the real box overlaps itself
    np.testing.assert_array_equal(iou, expected)


def test_pairwise_iou_gradient_is_finite_for_empty_union():
    boxes = jnp.array([[3, 3, 3, 3], [0, 0, 0, 0]], jnp.float32)
    grad = jax.jit(jax.grad(lambda b: pairwise_iou(b, b).sum()))(boxes)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_pairwise_iou_matches_reference_on_random_boxes():
    rng = np.random.default_rng(1)
    a, b = _random_boxes(rng, 20), _random_boxes(rng, 30)
    b[:3, 2:] = b[:3, :2]  # a few zero-area boxes
    iou = np.asarray(pairwise_iou(jnp.asarray(a), jnp.asarray(b)))
    expected = np.array([[_iou_reference(x, y) for y in b.astype(np.float64)]
                         for x in a.astype(np.float64)])
    assert (expected > 0).sum() > 20  # the set has real overlaps
    np.testing.assert_allclose(iou, expected, atol=1e-6)


# ----------------------------------------------------------------------------
# encode_boxes / decode_boxes
# ----------------------------------------------------------------------------

def test_encode_hand_case():
    # Reference: centre (5, 5), size 10x10. Target: centre (15, 25), size 20x40.
    ref = jnp.array([[0, 0, 10, 10]], jnp.float32)
    target = jnp.array([[5, 5, 25, 45]], jnp.float32)
    np.testing.assert_allclose(encode(target, ref)[0],
                               [1.0, 2.0, math.log(2), math.log(4)], rtol=1e-6)
    np.testing.assert_allclose(encode(target, ref, (10, 10, 5, 5))[0],
                               [10.0, 20.0, 5 * math.log(2), 5 * math.log(4)], rtol=1e-6)


def test_decode_hand_case():
    ref = jnp.array([[0, 0, 10, 10]], jnp.float32)
    deltas = jnp.array([[10.0, 20.0, 5 * math.log(2), 5 * math.log(4)]], jnp.float32)
    np.testing.assert_allclose(decode(deltas, ref, (10, 10, 5, 5))[0],
                               [5, 5, 25, 45], rtol=1e-5)


@pytest.mark.parametrize('weights', [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(2)
    ref = _random_boxes(rng, 200, min_size=2.0, max_size=100.0)
    target = _random_boxes(rng, 200, min_size=2.0, max_size=100.0)
    deltas = encode(jnp.asarray(target), jnp.asarray(ref), weights)
    decoded = decode(deltas, jnp.asarray(ref), weights)
    np.testing.assert_allclose(decoded, target, atol=2e-3)
    # And the other way round: encode(decode(d)) == d for moderate deltas.
    d = rng.normal(0, 1, (200, 4)).astype(np.float32) * np.asarray(weights, np.float32) / 5
    redone = encode(decode(jnp.asarray(d), jnp.asarray(ref), weights), jnp.asarray(ref),
                    weights)
    np.testing.assert_allclose(redone, d, atol=2e-4)


def test_encode_decode_leading_dims_broadcast():
    rng = np.random.default_rng(3)
    ref = _random_boxes(rng, 6).reshape(2, 3, 4)
    target = _random_boxes(rng, 6).reshape(2, 3, 4)
    deltas = box_ops.encode_boxes(jnp.asarray(target), jnp.asarray(ref))
    assert deltas.shape == (2, 3, 4)
    np.testing.assert_allclose(box_ops.decode_boxes(deltas, jnp.asarray(ref)), target,
                               atol=1e-3)


def test_encode_of_zero_size_padding_is_finite():
    ref = jnp.array([[0, 0, 10, 10]], jnp.float32)
    pad = jnp.zeros((1, 4), jnp.float32)
    assert np.all(np.isfinite(np.asarray(box_ops.encode_boxes(pad, ref))))


@pytest.mark.parametrize('weights', [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_clamps_huge_size_deltas(weights):
    ref = jnp.array([[0, 0, 16, 8]], jnp.float32)  # centre (8, 4)
    deltas = jnp.array([[0.0, 0.0, 1e4, 1e30]], jnp.float32)
    out = np.asarray(decode(deltas, ref, weights))[0]
    assert np.all(np.isfinite(out))
    # exp(log(1000 / 16)) = 62.5 times the reference size.
    np.testing.assert_allclose(out[2] - out[0], 16 * 62.5, rtol=1e-5)
    np.testing.assert_allclose(out[3] - out[1], 8 * 62.5, rtol=1e-5)
    np.testing.assert_allclose([(out[0] + out[2]) / 2, (out[1] + out[3]) / 2], [8, 4],
                               atol=1e-3)


def test_decode_custom_scale_clamp():
    ref = jnp.array([[0, 0, 10, 10]], jnp.float32)
    out = box_ops.decode_boxes(jnp.array([[0, 0, 5.0, 0.1]]), ref, scale_clamp=math.log(2))[0]
    np.testing.assert_allclose([out[2] - out[0], out[3] - out[1]],
                               [20.0, 10 * math.exp(0.1)], rtol=1e-5)


# ----------------------------------------------------------------------------
# clip_boxes
# ----------------------------------------------------------------------------

def test_clip_boxes_hand_case():
    boxes = jnp.array([[-5, -3, 50, 70], [10, 20, 30, 40], [200, 200, 300, 300]],
                      jnp.float32)
    out = clip(boxes, jnp.array([60, 40]))  # h = 60, w = 40
    np.testing.assert_array_equal(out, [[0, 0, 40, 60], [10, 20, 30, 40],
                                        [40, 60, 40, 60]])


def test_clip_boxes_per_image_sizes_broadcast():
    boxes = jnp.tile(jnp.array([[[-1, -1, 100, 100]]], jnp.float32), (2, 3, 1))
    sizes = jnp.array([[50, 60], [30, 20]], jnp.float32)  # (h, w) per image
    out = np.asarray(clip(boxes, sizes[:, None, :]))
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out[0], np.tile([0, 0, 60, 50], (3, 1)))
    np.testing.assert_array_equal(out[1], np.tile([0, 0, 20, 30], (3, 1)))
