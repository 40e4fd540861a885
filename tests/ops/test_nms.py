"""Tests for ops/nms.py against a plain greedy NMS written here in numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.ops import nms as nms_ops


def _iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    return inter / union if union > 0 else 0.0


def greedy_nms_reference(boxes, scores, valid, threshold):
    """Textbook greedy NMS; equal scores keep the input order (stable sort)."""
    boxes = np.asarray(boxes, np.float64)
    candidates = [i for i in np.argsort(-np.asarray(scores), kind='stable') if valid[i]]
    kept = []
    for i in candidates:
        if all(_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    keep = np.zeros(len(boxes), bool)
    keep[kept] = True
    return keep, kept  # mask, and the kept indices by decreasing score


def _random_sets(seed, num_sets, n):
    """Clustered boxes (so that many overlap), tied scores, some invalid."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(10, 60, (num_sets, 3, 2))
    which = rng.integers(0, 3, (num_sets, n))
    c = np.take_along_axis(centres, which[..., None], axis=1) + rng.normal(0, 4, (num_sets, n, 2))
    wh = rng.uniform(4, 20, (num_sets, n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], -1).astype(np.float32)
    scores = rng.integers(0, 8, (num_sets, n)).astype(np.float32) / 8  # many ties
    valid = rng.uniform(size=(num_sets, n)) > 0.15
    return boxes, scores, valid


nms_mask = jax.jit(nms_ops.nms_mask, static_argnums=3)
_batched_nms = jax.jit(jax.vmap(nms_ops.nms_mask, in_axes=(0, 0, 0, None)),
                       static_argnums=3)


@pytest.mark.parametrize('threshold', [0.3, 0.5, 0.7])
def test_nms_mask_matches_reference_on_random_sets(threshold):
    boxes, scores, valid = _random_sets(int(threshold * 10), num_sets=150, n=24)
    keep = np.asarray(_batched_nms(jnp.asarray(boxes), jnp.asarray(scores),
                                   jnp.asarray(valid), threshold))
    suppressed = 0
    for b, s, v, k in zip(boxes, scores, valid, keep):
        expected, _ = greedy_nms_reference(b, s, v, threshold)
        np.testing.assert_array_equal(k, expected)
        suppressed += (v & ~expected).sum()
    assert suppressed > 40  # the sets really exercise suppression


def test_nms_mask_unbatched_call_matches_reference():
    boxes, scores, valid = _random_sets(11, num_sets=1, n=40)
    keep = nms_mask(jnp.asarray(boxes[0]), jnp.asarray(scores[0]),
                            jnp.asarray(valid[0]), 0.5)
    np.testing.assert_array_equal(keep, greedy_nms_reference(boxes[0], scores[0],
                                                             valid[0], 0.5)[0])


def test_nms_chain_suppressed_box_does_not_suppress():
    # A suppresses B (IoU 70/130 = 0.54); B would suppress C (0.54) but is gone;
    # A and C overlap by 40/160 = 0.25, so C survives.
    boxes = jnp.array([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], jnp.float32)
    keep = nms_mask(boxes, jnp.array([0.9, 0.8, 0.7]), jnp.ones(3, bool), 0.5)
    np.testing.assert_array_equal(keep, [True, False, True])


def test_nms_long_chain_needs_many_rounds():
    # Ten boxes each overlapping the next by IoU 0.82: greedy keeps every other one.
    boxes = jnp.array([[i, 0, i + 10, 10] for i in range(10)], jnp.float32)
    scores = jnp.linspace(1.0, 0.1, 10)
    keep = nms_mask(boxes, scores, jnp.ones(10, bool), 0.7)
    np.testing.assert_array_equal(keep, np.arange(10) % 2 == 0)


def test_nms_equal_scores_keep_the_first_box():
    boxes = jnp.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], jnp.float32)
    keep = nms_mask(boxes, jnp.array([0.5, 0.7, 0.7]), jnp.ones(3, bool), 0.5)
    np.testing.assert_array_equal(keep, [False, True, False])


def test_nms_threshold_is_strict():
    # IoU exactly 0.5 is not "more than" the threshold: both are kept.
    boxes = jnp.array([[0, 0, 10, 10], [0, 0, 10, 5]], jnp.float32)
    keep = nms_mask(boxes, jnp.array([0.9, 0.8]), jnp.ones(2, bool), 0.5)
    np.testing.assert_array_equal(keep, [True, True])
    keep = nms_mask(boxes, jnp.array([0.9, 0.8]), jnp.ones(2, bool), 0.49)
    np.testing.assert_array_equal(keep, [True, False])


def test_nms_invalid_boxes_neither_kept_nor_suppress():
    boxes = jnp.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], jnp.float32)
    keep = nms_mask(boxes, jnp.array([0.99, 0.5, 0.3]),
                            jnp.array([False, True, False]), 0.5)
    np.testing.assert_array_equal(keep, [False, True, False])


def test_nms_all_invalid():
    boxes = jnp.zeros((4, 4), jnp.float32)
    keep = nms_mask(boxes, jnp.ones(4), jnp.zeros(4, bool), 0.5)
    np.testing.assert_array_equal(keep, np.zeros(4, bool))


# ----------------------------------------------------------------------------
# nms_top_k
# ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(3, 4))
def _top_k(boxes, scores, valid, threshold, max_output):
    return nms_ops.nms_top_k(boxes, scores, valid, threshold, max_output)


def test_nms_top_k_pads_when_max_output_exceeds_n():
    boxes = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 20, 5, 30]],
                      jnp.float32)
    scores = jnp.array([0.6, 0.9, 0.2, 0.4])
    valid = jnp.array([True, True, True, False])
    idx, top_scores, ok = _top_k(boxes, scores, valid, 0.5, 7)
    assert idx.shape == top_scores.shape == ok.shape == (7,)
    # Box 1 suppresses box 0; box 3 is invalid.
    np.testing.assert_array_equal(ok, [True, True] + [False] * 5)
    np.testing.assert_array_equal(np.asarray(idx)[:2], [1, 2])
    np.testing.assert_allclose(np.asarray(top_scores)[:2], [0.9, 0.2])
    assert np.all(np.isneginf(np.asarray(top_scores)[2:]))
    assert np.all((np.asarray(idx) >= 0) & (np.asarray(idx) < 4))


def test_nms_top_k_keeps_highest_scores_in_order():
    boxes, scores, valid = _random_sets(21, num_sets=1, n=40)
    idx, top_scores, ok = _top_k(jnp.asarray(boxes[0]), jnp.asarray(scores[0]),
                                 jnp.asarray(valid[0]), 0.5, 5)
    _, kept = greedy_nms_reference(boxes[0], scores[0], valid[0], 0.5)
    assert len(kept) > 5
    assert np.asarray(ok).all()
    np.testing.assert_allclose(top_scores, scores[0][kept[:5]])
    assert set(np.asarray(idx).tolist()) <= set(kept)


def test_nms_top_k_under_vmap_and_jit_matches_reference():
    boxes, scores, valid = _random_sets(31, num_sets=20, n=16)
    fn = jax.jit(jax.vmap(lambda b, s, v: nms_ops.nms_top_k(b, s, v, 0.6, 20)))
    idx, top_scores, ok = map(np.asarray, fn(jnp.asarray(boxes), jnp.asarray(scores),
                                             jnp.asarray(valid)))
    assert idx.shape == (20, 20)
    for i in range(20):
        _, kept = greedy_nms_reference(boxes[i], scores[i], valid[i], 0.6)
        assert ok[i].sum() == len(kept)
        assert set(idx[i][ok[i]].tolist()) == set(kept)
        np.testing.assert_allclose(top_scores[i][ok[i]], np.sort(scores[i][kept])[::-1])
