"""Tests for ops/matching.py: `match` labels and `sample_balanced` draws."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.ops import matching
from projects.maskrcnn.ops.matching import MatchLabel, sample_balanced

# Jitted: one compile is cheaper on CPU than eager dispatch of every op.
match = jax.jit(matching.match, static_argnums=(2, 3, 4))

NEG, IGN, POS = int(MatchLabel.NEGATIVE), int(MatchLabel.IGNORE), int(MatchLabel.POSITIVE)
RPN_LABELS = (MatchLabel.NEGATIVE, MatchLabel.IGNORE, MatchLabel.POSITIVE)


def test_match_label_values():
    assert (IGN, NEG, POS) == (-1, 0, 1)


# ----------------------------------------------------------------------------
# match
# ----------------------------------------------------------------------------

def test_match_thresholds_value_at_threshold_goes_up():
    # One ground truth, predictions at and around the thresholds (float32 values
    # equal to the float32 thresholds).
    iou = jnp.array([[0.0, 0.29, 0.3, 0.5, 0.69, 0.7, 0.95]], jnp.float32)
    idx, labels = match(iou, jnp.array([True]), (0.3, 0.7), RPN_LABELS, False)
    np.testing.assert_array_equal(labels, [NEG, NEG, IGN, IGN, IGN, POS, POS])
    np.testing.assert_array_equal(idx, np.zeros(7))
    assert labels.dtype == jnp.int32 and idx.dtype == jnp.int32


def test_match_single_threshold_and_best_ground_truth():
    iou = jnp.array([[0.6, 0.1, 0.5, 0.2],
                     [0.4, 0.3, 0.2, 0.49]], jnp.float32)
    idx, labels = match(iou, jnp.array([True, True]), (0.5,),
                        (MatchLabel.NEGATIVE, MatchLabel.POSITIVE), False)
    np.testing.assert_array_equal(idx, [0, 1, 0, 1])
    np.testing.assert_array_equal(labels, [POS, NEG, POS, NEG])


def test_match_custom_label_order():
    # The Fast R-CNN option: IGNORE below 0.1, NEGATIVE in [0.1, 0.5), POSITIVE above.
    iou = jnp.array([[0.05, 0.1, 0.3, 0.5]], jnp.float32)
    _, labels = match(iou, jnp.array([True]), (0.1, 0.5),
                      (MatchLabel.IGNORE, MatchLabel.NEGATIVE, MatchLabel.POSITIVE), False)
    np.testing.assert_array_equal(labels, [IGN, NEG, NEG, POS])


def test_match_low_quality_matches_with_ties():
    iou = jnp.array([
        [0.4, 0.1, 0.4, 0.2, 0.0],   # gt 0: best 0.4, tied at predictions 0 and 2
        [0.0, 0.0, 0.0, 0.0, 0.0],   # gt 1: no overlap at all -> gets no anchor
        [0.1, 0.2, 0.1, 0.25, 0.0],  # gt 2: best 0.25 at prediction 3
    ], jnp.float32)
    valid = jnp.array([True, True, True])
    _, without = match(iou, valid, (0.3, 0.7), RPN_LABELS, False)
    np.testing.assert_array_equal(without, [IGN, NEG, IGN, NEG, NEG])
    idx, labels = match(iou, valid, (0.3, 0.7), RPN_LABELS, True)
    np.testing.assert_array_equal(labels, [POS, NEG, POS, POS, NEG])
    np.testing.assert_array_equal(np.asarray(idx)[[0, 2, 3]], [0, 0, 2])


def test_match_padding_ground_truth_is_ignored():
    iou = jnp.array([
        [0.2, 0.1, 0.0],
        [0.9, 0.9, 0.9],   # padding row: must neither match nor make positives
    ], jnp.float32)
    idx, labels = match(iou, jnp.array([True, False]), (0.3, 0.7), RPN_LABELS, True)
    np.testing.assert_array_equal(idx, [0, 0, 0])
    # Prediction 0 is gt 0's low-quality match; the rest are negatives.
    np.testing.assert_array_equal(labels, [POS, NEG, NEG])


def test_match_no_valid_ground_truth_gives_all_negative():
    iou = jnp.array([[0.9, 0.5, 0.0], [0.8, 0.2, 0.75]], jnp.float32)
    for low_quality in (False, True):
        _, labels = match(iou, jnp.array([False, False]), (0.3, 0.7), RPN_LABELS,
                          low_quality)
        np.testing.assert_array_equal(labels, [NEG, NEG, NEG])
    # Even where the lowest interval is IGNORE (the Fast R-CNN option): an image
    # without objects is all background, as in Detectron2's ROI heads.
    _, labels = match(iou, jnp.array([False, False]), (0.1, 0.5),
                      (MatchLabel.IGNORE, MatchLabel.NEGATIVE, MatchLabel.POSITIVE), False)
    np.testing.assert_array_equal(labels, [NEG, NEG, NEG])


def _numpy_match(iou, valid, thresholds, labels, low_quality):
    iou = np.where(valid[:, None], iou, -1.0)
    vals, idx = iou.max(0), iou.argmax(0)
    out = np.asarray(labels)[np.searchsorted(thresholds, vals, side='right')]
    if low_quality:
        best = iou.max(1, keepdims=True)
        out = np.where(((iou == best) & valid[:, None] & (best > 0)).any(0), POS, out)
    return idx, np.where(valid.any(), out, NEG)


@pytest.mark.parametrize('low_quality', [False, True])
def test_match_agrees_with_argmax_on_many_ties(low_quality):
    # IoUs on a coarse grid, so that most columns have tied maxima: the chain
    # over ground-truth rows must pick the first, as argmax does.
    rng = np.random.default_rng(0)
    iou = (rng.integers(0, 5, (37, 500)) / 4).astype(np.float32)
    valid = rng.random(37) < 0.6
    idx, labels = match(jnp.asarray(iou), jnp.asarray(valid), (0.3, 0.7), RPN_LABELS,
                        low_quality)
    want_idx, want_labels = _numpy_match(iou, valid, (0.3, 0.7), RPN_LABELS, low_quality)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(labels, want_labels)


def test_match_label_count_mismatch_raises():
    with pytest.raises(ValueError, match='need 3 labels'):
        matching.match(jnp.zeros((1, 2)), jnp.array([True]), (0.3, 0.7),
              (MatchLabel.NEGATIVE, MatchLabel.POSITIVE), False)


# ----------------------------------------------------------------------------
# sample_balanced
# ----------------------------------------------------------------------------

def _labels(num_pos, num_neg, num_ign, seed=0):
    labels = np.array([POS] * num_pos + [NEG] * num_neg + [IGN] * num_ign, np.int32)
    return np.random.default_rng(seed).permutation(labels)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample(key, labels, num_samples, fraction, valid):
    return sample_balanced(key, labels, num_samples, fraction, valid)


def _check_draw(labels, valid, idx, is_pos, ok, exp_pos, exp_total):
    idx, is_pos, ok = map(np.asarray, (idx, is_pos, ok))
    assert idx.dtype == np.int32
    assert is_pos.sum() == exp_pos and ok.sum() == exp_total
    # Positives first, then negatives, then empty slots.
    np.testing.assert_array_equal(is_pos, np.arange(len(idx)) < exp_pos)
    np.testing.assert_array_equal(ok, np.arange(len(idx)) < exp_total)
    drawn = idx[ok]
    assert len(set(drawn.tolist())) == len(drawn)  # without replacement
    assert np.all(labels[idx[is_pos]] == POS)
    assert np.all(labels[idx[ok & ~is_pos]] == NEG)
    assert np.all(valid[drawn])


def test_sample_balanced_caps_positives_and_fills_with_negatives():
    labels = _labels(10, 100, 20)
    valid = np.ones(len(labels), bool)
    out = _sample(jax.random.PRNGKey(0), jnp.asarray(labels), 32, 0.25, jnp.asarray(valid))
    _check_draw(labels, valid, *out, exp_pos=8, exp_total=32)


def test_sample_balanced_few_positives_more_negatives():
    labels = _labels(3, 100, 20)
    valid = np.ones(len(labels), bool)
    out = _sample(jax.random.PRNGKey(1), jnp.asarray(labels), 32, 0.25, jnp.asarray(valid))
    _check_draw(labels, valid, *out, exp_pos=3, exp_total=32)


def test_sample_balanced_too_few_entries_leaves_empty_slots():
    labels = _labels(3, 5, 30)
    valid = np.ones(len(labels), bool)
    idx, is_pos, ok = _sample(jax.random.PRNGKey(2), jnp.asarray(labels), 32, 0.5,
                              jnp.asarray(valid))
    _check_draw(labels, valid, idx, is_pos, ok, exp_pos=3, exp_total=8)
    # Every eligible entry is drawn exactly once.
    assert sorted(np.asarray(idx)[np.asarray(ok)]) == sorted(np.flatnonzero(labels >= 0))


def test_sample_balanced_more_slots_than_entries():
    labels = _labels(2, 4, 1)
    valid = np.ones(len(labels), bool)
    idx, is_pos, ok = _sample(jax.random.PRNGKey(3), jnp.asarray(labels), 20, 0.5,
                              jnp.asarray(valid))
    assert idx.shape == (20,)
    _check_draw(labels, valid, idx, is_pos, ok, exp_pos=2, exp_total=6)


def test_sample_balanced_never_draws_invalid_entries():
    labels = _labels(20, 40, 10, seed=4)
    valid = np.ones(len(labels), bool)
    valid[np.flatnonzero(labels == POS)[:15]] = False   # 5 valid positives left
    valid[np.flatnonzero(labels == NEG)[:30]] = False   # 10 valid negatives left
    idx, is_pos, ok = _sample(jax.random.PRNGKey(5), jnp.asarray(labels), 32, 0.5,
                              jnp.asarray(valid))
    _check_draw(labels, valid, idx, is_pos, ok, exp_pos=5, exp_total=15)


def test_sample_balanced_without_valid_argument():
    labels = jnp.asarray(_labels(6, 6, 6))
    idx, is_pos, ok = jax.jit(sample_balanced, static_argnums=(2, 3))(
        jax.random.PRNGKey(0), labels, 8, 0.5)
    _check_draw(np.asarray(labels), np.ones(18, bool), idx, is_pos, ok,
                exp_pos=4, exp_total=8)


def test_sample_balanced_no_positives():
    labels = _labels(0, 50, 5)
    valid = np.ones(len(labels), bool)
    out = _sample(jax.random.PRNGKey(6), jnp.asarray(labels), 16, 0.5, jnp.asarray(valid))
    _check_draw(labels, valid, *out, exp_pos=0, exp_total=16)


def test_sample_balanced_depends_on_rng():
    labels = jnp.asarray(_labels(30, 200, 0))
    valid = jnp.ones(230, bool)
    a = _sample(jax.random.PRNGKey(0), labels, 32, 0.25, valid)[0]
    b = _sample(jax.random.PRNGKey(1), labels, 32, 0.25, valid)[0]
    c = _sample(jax.random.PRNGKey(0), labels, 32, 0.25, valid)[0]
    np.testing.assert_array_equal(a, c)
    assert set(np.asarray(a).tolist()) != set(np.asarray(b).tolist())


def test_sample_balanced_is_roughly_uniform():
    # 20 positives, 5 slots for them: each has probability 1/4 per draw.
    # 60 negatives fill 15 slots: probability 1/4 too. Ignored: never.
    labels = _labels(20, 60, 20, seed=7)
    valid = jnp.ones(len(labels), bool)
    trials = 2000
    keys = jax.random.split(jax.random.PRNGKey(42), trials)
    draw = jax.jit(jax.vmap(lambda k: sample_balanced(k, jnp.asarray(labels), 20, 0.25,
                                                      valid)))
    idx, _, ok = map(np.asarray, draw(keys))
    assert ok.all()
    counts = np.bincount(idx.ravel(), minlength=len(labels))
    assert np.all(counts[labels == IGN] == 0)
    eligible = counts[labels != IGN]
    expected = trials * 0.25
    sigma = np.sqrt(trials * 0.25 * 0.75)  # ~19.4
    assert np.all(np.abs(eligible - expected) < 5 * sigma), eligible
    # Not a degenerate spread either: the counts vary like binomial draws.
    assert 0.3 * sigma < eligible.std() < 2 * sigma
