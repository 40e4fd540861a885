"""Tests for ops/roi_align.py against a slow numpy RoIAlign written here.

The reference follows torchvision's documented roi_align semantics: each of the
output_size x output_size bins averages sampling_ratio x sampling_ratio bilinear
samples at the sub-bin centres; a sample with y < -1 or y > H (likewise x)
contributes 0 (and still counts in the average); coordinates below 0 are
clamped to 0; a sample at or past the last row/column reads that row/column;
aligned=True shifts the scaled box by -0.5, aligned=False makes it at least 1x1.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.ops import roi_align
from projects.maskrcnn.ops import targets as target_ops

MIN_LEVEL = 2
STRIDES = (4, 8, 16, 32)
IMPLS = ('gather', 'matmul')


def _bilinear_reference(feat, y, x):
    h, w = feat.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(feat.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y_lo, x_lo = int(y), int(x)
    if y_lo >= h - 1:
        y_lo = y_hi = h - 1
        y = float(y_lo)
    else:
        y_hi = y_lo + 1
    if x_lo >= w - 1:
        x_lo = x_hi = w - 1
        x = float(x_lo)
    else:
        x_hi = x_lo + 1
    ly, lx = y - y_lo, x - x_lo
    return ((1 - ly) * (1 - lx) * feat[y_lo, x_lo] + (1 - ly) * lx * feat[y_lo, x_hi]
            + ly * (1 - lx) * feat[y_hi, x_lo] + ly * lx * feat[y_hi, x_hi])


def roi_align_reference(feat, box, scale, output_size, ratio, aligned):
    """One box on one [H, W, C] map, in float64 loops."""
    feat = np.asarray(feat, np.float64)
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * scale - off for v in box)
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bw, bh = rw / output_size, rh / output_size
    out = np.zeros((output_size, output_size, feat.shape[-1]))
    for ph in range(output_size):
        for pw in range(output_size):
            acc = 0.0
            for iy in range(ratio):
                y = y1 + ph * bh + (iy + 0.5) * bh / ratio
                for ix in range(ratio):
                    x = x1 + pw * bw + (ix + 0.5) * bw / ratio
                    acc = acc + _bilinear_reference(feat, y, x)
            out[ph, pw] = acc / (ratio * ratio)
    return out


def level_reference(box, min_level=2, max_level=5, canonical_size=224.0, canonical_level=4):
    area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    lvl = math.floor(canonical_level + math.log2(math.sqrt(area) / canonical_size + 1e-8))
    return min(max(lvl, min_level), max_level)


assign_levels = jax.jit(roi_align.assign_levels, static_argnums=(1, 2, 3))
crop_and_resize_masks = jax.jit(roi_align.crop_and_resize_masks, static_argnums=3)
mask_targets = jax.jit(target_ops.mask_targets, static_argnums=4)


@functools.partial(jax.jit, static_argnames=('output_size', 'sampling_ratio', 'aligned', 'impl'))
def _align(features, boxes, output_size, sampling_ratio, aligned, impl='gather'):
    return roi_align.multilevel_roi_align(features, STRIDES, boxes, output_size,
                                          sampling_ratio, aligned, MIN_LEVEL, impl=impl)


def _pyramid(rng, image_hw=(384, 512), channels=3):
    # Not square, so that mixing up rows and columns shows.
    return [rng.normal(size=(image_hw[0] // s, image_hw[1] // s, channels)).astype(np.float32)
            for s in STRIDES]


def _boxes_on_all_levels(rng):
    """Boxes whose sqrt(area) falls inside each level's range (away from the
    boundaries 112, 224, 448), some hanging over the image edges, plus tiny ones."""
    boxes = []
    for lo, hi, n in [(10, 100, 6), (120, 210, 5), (240, 430, 5), (460, 700, 4)]:
        for _ in range(n):
            s, r = rng.uniform(lo, hi), rng.uniform(0.6, 1.6)
            w, h = s * r, s / r
            cx, cy = rng.uniform(-60, 570), rng.uniform(-60, 440)
            boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    boxes += [[100.3, 200.6, 101.1, 201.0],   # far below 1 pixel on P2
              [505.0, 3.0, 511.5, 7.5],       # near the right edge
              [3.0, 378.0, 9.0, 383.0],       # near the bottom edge
              [-30.0, -30.0, -3.0, -2.0],     # entirely above-left of the image
              [530.0, 400.0, 560.0, 480.0]]   # entirely below-right
    return np.asarray(boxes, np.float32)


# ----------------------------------------------------------------------------
# assign_levels
# ----------------------------------------------------------------------------

def test_assign_levels_hand_cases():
    sides = [8.0, 111.0, 112.0, 223.0, 224.0, 447.0, 448.0, 2000.0, 0.0]
    boxes = jnp.array([[10, 10, 10 + s, 10 + s] for s in sides], jnp.float32)
    levels = assign_levels(boxes, 2, 5)
    np.testing.assert_array_equal(levels, [2, 2, 3, 3, 4, 4, 5, 5, 2])
    # sqrt(area) is what counts, not the longer side: 448 x 112 -> 224 -> level 4.
    assert int(assign_levels(jnp.array([0, 0, 448, 112.0]), 2, 5)) == 4
    assert levels.dtype == jnp.int32


def test_assign_levels_respects_clamp_and_canonical_arguments():
    boxes = jnp.array([[0, 0, 10, 10], [0, 0, 56, 56], [0, 0, 1000, 1000]], jnp.float32)
    np.testing.assert_array_equal(assign_levels(boxes, 3, 4), [3, 3, 4])
    # Canonical 28 at level 4: 10 -> floor(4 + log2(10/28)) = 2; 56 -> 5.
    np.testing.assert_array_equal(assign_levels(boxes, 2, 6, 28.0),
                                  [2, 5, 6])


def test_random_boxes_cover_every_level():
    boxes = _boxes_on_all_levels(np.random.default_rng(0))
    levels = np.asarray(assign_levels(jnp.asarray(boxes), 2, 5))
    expected = [level_reference(b) for b in boxes.astype(np.float64)]
    np.testing.assert_array_equal(levels, expected)
    assert set(expected) == {2, 3, 4, 5}


# ----------------------------------------------------------------------------
# multilevel_roi_align
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('ratio', [1, 2])
@pytest.mark.parametrize('impl', IMPLS)
def test_multilevel_roi_align_matches_reference(aligned, ratio, impl):
    rng = np.random.default_rng(1)
    feats = _pyramid(rng)
    boxes = _boxes_on_all_levels(rng)
    out = np.asarray(_align([jnp.asarray(f) for f in feats], jnp.asarray(boxes),
                            output_size=5, sampling_ratio=ratio, aligned=aligned, impl=impl))
    assert out.shape == (len(boxes), 5, 5, 3)
    for i, box in enumerate(boxes):
        lvl = level_reference(box.astype(np.float64))
        expected = roi_align_reference(feats[lvl - MIN_LEVEL], box, 1.0 / 2 ** lvl, 5,
                                       ratio, aligned)
        np.testing.assert_allclose(out[i], expected, atol=1e-4, err_msg=f'box {i} {box}')
    # The boxes outside the image read zeros (all samples beyond -1 / H).
    np.testing.assert_array_equal(out[-1], 0.0)


def test_aligned_flag_changes_the_result():
    rng = np.random.default_rng(2)
    feats = [jnp.asarray(f) for f in _pyramid(rng)]
    boxes = jnp.asarray(_boxes_on_all_levels(rng)[:6])
    a = _align(feats, boxes, output_size=5, sampling_ratio=2, aligned=True)
    b = _align(feats, boxes, output_size=5, sampling_ratio=2, aligned=False)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0.05


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('impl', IMPLS)
def test_constant_features_give_the_constant_inside_the_image(aligned, impl):
    feats = [jnp.full((128 // s, 128 // s, 2), 3.7, jnp.float32) for s in STRIDES]
    boxes = jnp.array([[10, 12, 50, 60], [0.5, 0.5, 127, 127], [30, 40, 31, 41]], jnp.float32)
    out = _align(feats, boxes, output_size=7, sampling_ratio=2, aligned=aligned, impl=impl)
    np.testing.assert_allclose(out, 3.7, rtol=1e-6)


@pytest.mark.parametrize('impl', IMPLS)
def test_linear_features_give_the_value_at_bin_centres(impl):
    # Bilinear interpolation reproduces a linear function exactly, so each bin
    # (aligned=True) holds f at its centre. Each level has its own function, so a
    # box read from the wrong level would show.
    image_h, image_w = 256, 320
    coeffs = [(1.0, 2.0, 0.0), (-1.5, 0.5, 10.0), (0.25, -3.0, 5.0), (2.0, 2.0, -7.0)]
    feats = []
    for s, (a, b, c) in zip(STRIDES, coeffs):
        yy, xx = np.meshgrid(np.arange(image_h // s), np.arange(image_w // s), indexing='ij')
        feats.append(jnp.asarray((a * yy + b * xx + c)[..., None], jnp.float32))
    boxes = np.array([[20, 30, 80, 70], [40, 16, 220, 170], [8, 8, 312, 248]], np.float32)
    out = np.asarray(_align(feats, jnp.asarray(boxes), output_size=4, sampling_ratio=2,
                            aligned=True, impl=impl))
    for i, box in enumerate(boxes):
        lvl = level_reference(box.astype(np.float64))
        s = 2 ** lvl
        a, b, c = coeffs[lvl - MIN_LEVEL]
        x1, y1, x2, y2 = box / s - 0.5
        centres = lambda lo, hi: lo + (np.arange(4) + 0.5) * (hi - lo) / 4
        expected = a * centres(y1, y2)[:, None] + b * centres(x1, x2)[None, :] + c
        np.testing.assert_allclose(out[i, ..., 0], expected, rtol=1e-5, atol=1e-4)
    assert sorted({level_reference(b) for b in boxes.astype(np.float64)}) == [2, 3, 4]


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('impl', IMPLS)
def test_samples_at_the_far_edge_read_the_last_row_and_beyond_it_zero(aligned, impl):
    # A 16 x 16 image: P2 is 4 x 4. One bin, one sample at the box centre.
    # Box [0, 14, 4, 18] on P2: y from 3.5 to 4.5 (aligned: 3.0 to 4.0), x from 0 to 1
    # (aligned: -0.5 to 0.5). Sample: y = 4.0 (aligned 3.5), x = 0.5 (aligned 0.0).
    feat = np.arange(16, dtype=np.float32).reshape(4, 4, 1) * 10
    feats = [jnp.asarray(feat)] + [jnp.zeros((16 // s, 16 // s, 1)) for s in STRIDES[1:]]
    boxes = jnp.array([[0, 14, 4, 18], [0, 16.4, 4, 20.4], [14, 0, 18, 4],
                       [16.4, 0, 20.4, 4]], jnp.float32)
    out = np.asarray(_align(feats, boxes, output_size=1, sampling_ratio=1,
                            aligned=aligned, impl=impl))[:, 0, 0, 0]
    if aligned:
        # y = 3.5 -> last row (x = 0.0 -> column 0); y = 4.1 > H -> zero. Likewise x.
        expected = [feat[3, 0, 0], 0.0, feat[0, 3, 0], 0.0]
    else:
        # y = 4.0 == H: still inside, reads row 3 (x = 0.5 between columns 0 and 1);
        # y = 4.6 > H: outside, zero. Likewise for x.
        expected = [0.5 * (feat[3, 0, 0] + feat[3, 1, 0]), 0.0,
                    0.5 * (feat[0, 3, 0] + feat[1, 3, 0]), 0.0]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    for box, value in zip(np.asarray(boxes), out):
        ref = roi_align_reference(feat, box, 0.25, 1, 1, aligned)
        np.testing.assert_allclose(value, ref[0, 0, 0], rtol=1e-6, atol=1e-6)


def test_matmul_and_gather_agree_in_value_and_feature_gradient():
    # The matrix form is exact, not an approximation: same outputs and the same
    # gradient with respect to the features, on boxes at every level and off the map.
    rng = np.random.default_rng(3)
    feats = [jnp.asarray(f) for f in _pyramid(rng, channels=4)]
    boxes = jnp.asarray(_boxes_on_all_levels(rng))
    cotangent = jnp.asarray(rng.normal(size=(len(boxes), 7, 7, 4)).astype(np.float32))

    def loss(fs, impl):
        return jnp.sum(_align(fs, boxes, output_size=7, sampling_ratio=2, aligned=True,
                              impl=impl) * cotangent)

    values = {impl: jax.value_and_grad(loss)(feats, impl) for impl in IMPLS}
    np.testing.assert_allclose(values['matmul'][0], values['gather'][0], rtol=1e-4)
    for g_matmul, g_gather in zip(values['matmul'][1], values['gather'][1]):
        assert float(jnp.abs(g_gather).max()) > 0.0
        np.testing.assert_allclose(g_matmul, g_gather, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('sampling_ratio,aligned', [(2, True), (1, False)])
def test_gather_gradient_with_respect_to_boxes_matches_autodiff(sampling_ratio, aligned):
    # The gather form's hand-written gradient covers the sampling weights too: the
    # boxes' gradient equals plain autodiff through the matrix form's weights.
    rng = np.random.default_rng(4)
    feats = [jnp.asarray(f) for f in _pyramid(rng, channels=3)]
    boxes = jnp.asarray(_boxes_on_all_levels(rng))
    cotangent = jnp.asarray(rng.normal(size=(len(boxes), 5, 5, 3)).astype(np.float32))

    def loss(b, impl):
        return jnp.sum(_align(feats, b, output_size=5, sampling_ratio=sampling_ratio,
                              aligned=aligned, impl=impl) * cotangent)

    grads = {impl: jax.grad(loss)(boxes, impl) for impl in IMPLS}
    assert float(jnp.abs(grads['gather']).max()) > 0.0
    np.testing.assert_allclose(grads['gather'], grads['matmul'], rtol=1e-4, atol=1e-4)


def test_auto_picks_the_matrix_form_for_small_maps_only():
    def pyramid(h, w, c=256):
        return [(h // s, w // s, c) for s in STRIDES]
    assert roi_align.choose_impl(pyramid(128, 128, 64), 7, 2) == 'matmul'
    assert roi_align.choose_impl(pyramid(128, 128, 64), 14, 2) == 'matmul'
    assert roi_align.choose_impl(pyramid(800, 1216), 7, 2) == 'gather'
    assert roi_align.choose_impl(pyramid(800, 1216), 14, 2) == 'gather'
    # Inference: the gather form's forward pass is the faster one at every size.
    assert roi_align.choose_impl(pyramid(128, 128, 64), 7, 2, with_gradient=False) == 'gather'


def test_unknown_impl_is_an_error_naming_it():
    feats = [jnp.zeros((8, 8, 1))] * 4
    with pytest.raises(ValueError, match="'fast'"):
        roi_align.multilevel_roi_align(feats, STRIDES, jnp.zeros((1, 4)), 7, 2, True, 2,
                                       impl='fast')


def test_non_positive_sampling_ratio_is_an_error():
    feats = [jnp.zeros((8, 8, 1))] * 4
    with pytest.raises(ValueError, match='sampling_ratio'):
        roi_align.multilevel_roi_align(feats, STRIDES, jnp.zeros((1, 4)), 7, 0, True, 2)


# ----------------------------------------------------------------------------
# crop_and_resize_masks
# ----------------------------------------------------------------------------

def test_crop_read_at_its_own_box_reproduces_the_crop():
    rng = np.random.default_rng(3)
    masks = rng.uniform(size=(2, 8, 8)).astype(np.float32)
    boxes = jnp.array([[10, 20, 50, 44], [0, 0, 8, 8]], jnp.float32)
    out = crop_and_resize_masks(jnp.asarray(masks), boxes, boxes, 8)
    np.testing.assert_allclose(out, masks, atol=1e-6)


def test_crop_read_at_its_own_box_at_another_resolution():
    # A linear ramp along x: resampling 8 -> 12 reproduces the ramp at the
    # new pixel centres in the interior (away from the clamped border).
    ramp = np.tile(np.arange(8, dtype=np.float32) / 7, (8, 1))
    box = jnp.array([[0, 0, 16, 16]], jnp.float32)
    out = np.asarray(crop_and_resize_masks(jnp.asarray(ramp[None]), box, box, 12))[0]
    centres = (np.arange(12) + 0.5) * 8 / 12 - 0.5   # in crop-pixel index units
    interior = (centres >= 0) & (centres <= 7)
    np.testing.assert_allclose(out[:, interior], np.tile(centres[interior] / 7, (12, 1)),
                               atol=1e-6)
    assert interior.sum() == 10


def test_left_and_right_halves_of_the_mask_box():
    # Mask box 80 wide, 40 high, S = 8: a crop pixel is 10 x 5. Reading the left
    # half (40 x 40) at 4 x 4 puts x samples exactly on columns 0..3 and y samples
    # half way between rows 2i and 2i + 1.
    rng = np.random.default_rng(4)
    mask = rng.uniform(size=(8, 8)).astype(np.float32)
    mask_box = jnp.array([[100, 50, 180, 90]], jnp.float32)
    rows = 0.5 * (mask[0::2] + mask[1::2])    # [4, 8]
    left = crop_and_resize_masks(jnp.asarray(mask[None]), mask_box,
                                           jnp.array([[100, 50, 140, 90]], jnp.float32), 4)
    right = crop_and_resize_masks(jnp.asarray(mask[None]), mask_box,
                                            jnp.array([[140, 50, 180, 90]], jnp.float32), 4)
    np.testing.assert_allclose(left[0], rows[:, :4], atol=1e-6)
    np.testing.assert_allclose(right[0], rows[:, 4:], atol=1e-6)


def test_binary_left_half_mask_reads_ones_on_the_left():
    mask = np.zeros((1, 28, 28), np.float32)
    mask[0, :, :14] = 1.0
    box = jnp.array([[0, 0, 56, 56]], jnp.float32)
    out = np.asarray(crop_and_resize_masks(
        jnp.asarray(mask), box, jnp.array([[0, 0, 28, 56]], jnp.float32), 14))[0]
    # Left half of the box at 14 x 14: x samples at crop columns 0, 1, ..., 13.
    np.testing.assert_allclose(out, 1.0)


def test_crop_box_far_outside_reads_zero():
    masks = jnp.ones((1, 8, 8), jnp.float32)
    out = crop_and_resize_masks(masks, jnp.array([[0, 0, 10, 10]], jnp.float32),
                                          jnp.array([[30, 30, 50, 50]], jnp.float32), 6)
    np.testing.assert_array_equal(out, 0.0)


def test_pixels_outside_the_mask_box_read_zero():
    # Mask box [0, 10] with S = 10 (one image unit per crop pixel), all ones.
    # Reading [-5, 15] at 20 px gives output pixel centres -4.5, ..., 14.5; only
    # the centres 0.5 .. 9.5 (outputs 5 .. 14) lie inside the mask box.
    masks = jnp.ones((1, 10, 10), jnp.float32)
    mask_box = jnp.array([[0, 0, 10, 10]], jnp.float32)
    crop_box = jnp.array([[-5, -5, 15, 15]], jnp.float32)
    out = np.asarray(crop_and_resize_masks(masks, mask_box, crop_box, 20))[0]
    targets = np.asarray(mask_targets(masks, mask_box, jnp.array([0]),
                                                 crop_box, 20))[0]
    inside = np.zeros(20, bool)
    inside[5:15] = True
    np.testing.assert_allclose(out[np.ix_(inside, inside)], 1.0)  # passes today
    # Fails today: out[10, 4] == out[10, 15] == 1.0 (centres at x = -0.5 and 10.5).
    assert np.all(out[:, ~inside] < 0.5), out[10]
    np.testing.assert_array_equal(targets, np.outer(inside, inside).astype(np.float32))


def test_both_forms_give_float32_from_bfloat16_features():
    rng = np.random.default_rng(4)
    feats = [jnp.asarray(f, jnp.bfloat16) for f in _pyramid(rng, image_hw=(64, 96))]
    boxes = jnp.asarray([[4.0, 6.0, 40.0, 50.0], [10.0, 3.0, 90.0, 60.0]])
    outs = {impl: _align(feats, boxes, output_size=3, sampling_ratio=2, aligned=True, impl=impl)
            for impl in IMPLS}
    assert all(o.dtype == jnp.float32 for o in outs.values())
    np.testing.assert_allclose(outs['matmul'], outs['gather'], rtol=1e-2, atol=1e-2)
