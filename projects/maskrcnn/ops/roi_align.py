"""RoIAlign over a feature pyramid, with no per-level loop, in two forms.

Follows the semantics of torchvision's roi_align (bilinear sampling at a fixed
number of points per bin, averaged; zero outside the map) and the FPN level
rule of Detectron2's ROIPooler or torchvision's MultiScaleRoIAlign.

'gather': the pyramid is flattened into one [sum HW, C] table per image and
each box reads the four corners of each of its samples from the level it is
assigned to, the multilevel_crop_and_resize design of tensorflow/tpu. The
reads are grouped by pairing of a y corner with an x corner, one gather per
pairing summed straight into the [R, S, S, C] output, and the gradient is a
chain of scatter-adds. Its cost grows with the samples, not with the map, so it
suits large maps, and its forward pass is the faster one at every map size.

'matmul': bilinear sampling averaged over a bin is separable, so a box's
output is Ay @ F @ Ax^T per channel, with Ay [bins, H] and Ax [bins, W] dense
interpolation matrices that hold each bin's averaged corner weights. The
levels' rows are stacked (padded to the widest level) so that one matrix
product over all boxes and levels does the rows, and a batched one the
columns; the gradient is two matrix products instead of a scatter-add. Its
cost grows with the map, so it suits training on small maps; 'auto' picks
between them from the static shapes and whether a gradient is taken
(`choose_impl`). Both give the same result.

Adaptive sampling (Detectron2's sampling_ratio=0) takes ceil(roi_side / bins)
samples per bin along each axis, a number that depends on the box. Static
shapes need a bound, so each axis draws `adaptive_cap` sample slots per bin and
masks the slots beyond the box's own count; the result is exact for every box
whose count is at most the cap, and uses `adaptive_cap` evenly spaced samples
(instead of more) for boxes beyond it.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

LEVEL_RULES = ('detectron2', 'torchvision')


def assign_levels(boxes: jnp.ndarray, min_level: int, max_level: int,
                  canonical_size: float = 224.0, canonical_level: int = 4,
                  rule: str = 'detectron2') -> jnp.ndarray:
    """FPN level of each [..., 4] box: floor(4 + log2(sqrt(area) / 224)), clamped.

    The references guard the floor with different epsilons: 'detectron2' takes
    log2(s / 224 + 1e-8), 'torchvision' (its LevelMapper) log2(s / 224) + 1e-6.
    """
    if rule not in LEVEL_RULES:
        raise ValueError(f'unknown level rule {rule!r}; expected one of {LEVEL_RULES}')
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    size = jnp.sqrt(jnp.maximum(w * h, 0.0))
    if rule == 'detectron2':
        level = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
    else:
        level = jnp.floor(canonical_level + jnp.log2(size / canonical_size) + 1e-6)
    return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def _axis_samples(start, length, out_size, slots, limit, count=None):
    """Sample coordinates along one axis, their bilinear corners and weights.

    Args:
      start, length: [R] box start and extent in feature-map units.
      out_size: bins along the axis. slots: sample slots per bin (static).
      limit: [R] feature-map size along the axis (of each box's level).
      count: None to use all `slots` samples per bin, or [R] samples per bin of
        each box (<= slots); the slots past it get zero weight.

    Returns:
      low, high: [R, P] int32 neighbouring indices; w_low, w_high: [R, P]
      weights, already divided by the samples per bin (zero for samples that
      fall outside the map or past `count`). P = out_size * slots.
    """
    bin_size = (length / out_size)[:, None]
    slot = jnp.arange(out_size * slots)
    bin_idx = (slot // slots).astype(jnp.float32)[None, :]
    sub = (slot % slots).astype(jnp.float32)[None, :]
    if count is None:
        per_bin = jnp.full_like(start, float(slots))[:, None]
        used = jnp.ones((1, out_size * slots), bool)
    else:
        per_bin = jnp.maximum(count, 1.0)[:, None]
        used = sub < count[:, None]
    coord = start[:, None] + bin_idx * bin_size + (sub + 0.5) * bin_size / per_bin
    limit = limit[:, None].astype(jnp.float32)
    inside = (coord >= -1.0) & (coord <= limit) & used
    coord = jnp.maximum(coord, 0.0)
    low = jnp.floor(coord)
    at_edge = low >= limit - 1
    low = jnp.where(at_edge, limit - 1, low)
    high = jnp.where(at_edge, limit - 1, low + 1)
    coord = jnp.where(at_edge, low, coord)
    frac = coord - low
    w_low = jnp.where(inside, (1.0 - frac) / per_bin, 0.0)
    w_high = jnp.where(inside, frac / per_bin, 0.0)
    return low.astype(jnp.int32), high.astype(jnp.int32), w_low, w_high


IMPLS = ('auto', 'gather', 'matmul')

# 'auto' takes the matrix form while its multiply-adds per box and channel are at
# most this many times the gather form's corner reads (measured on CPU with
# benchmarks/roi_align_benchmark.py; see BENCHMARKS.md).
MATMUL_COST_RATIO = 40.0


def choose_impl(feature_shapes: Sequence[Sequence[int]], output_size: int, slots: int,
                with_gradient: bool = True) -> str:
    """'matmul' or 'gather' for pooling from maps of these [H, W, C] shapes.

    Without a gradient (inference) the gather form is faster at every size
    measured; the matrix form only pays for its gradient on small maps.
    """
    if not with_gradient:
        return 'gather'
    rows = sum(s[0] for s in feature_shapes)
    max_w = max(s[1] for s in feature_shapes)
    matmul_cost = output_size * rows * max_w + output_size ** 2 * max_w
    gather_cost = 4 * (output_size * slots) ** 2
    return 'matmul' if matmul_cost <= MATMUL_COST_RATIO * gather_cost else 'gather'


def _interpolation_matrix(low, high, w_low, w_high, out_size, slots, size):
    """[R, out_size, size]: each bin's sample weights summed onto the indices they read."""
    grid = jnp.arange(size)
    m = (jnp.where(low[..., None] == grid, w_low[..., None], 0.0)
         + jnp.where(high[..., None] == grid, w_high[..., None], 0.0))
    return m.reshape(m.shape[0], out_size, slots, size).sum(axis=2)


def multilevel_roi_align(features: Sequence[jnp.ndarray], strides: Sequence[int],
                         boxes: jnp.ndarray, output_size: int, sampling_ratio: int,
                         aligned: bool, min_level: int,
                         canonical_size: float = 224.0, canonical_level: int = 4,
                         level_rule: str = 'detectron2',
                         adaptive_cap: int | None = None,
                         impl: str = 'auto', with_gradient: bool = True) -> jnp.ndarray:
    """Pools [R, 4] boxes from one image's pyramid.

    Args:
      features: L arrays [H_l, W_l, C], finest first, for levels
        min_level .. min_level + L - 1.
      strides: L strides (2 ** level).
      boxes: [R, 4] xyxy in image pixels.
      output_size: bins per side (7 for boxes, 14 for masks).
      sampling_ratio: bilinear samples per bin and axis; 0 selects adaptive
        sampling, which needs `adaptive_cap`.
      aligned: shift by half a pixel (Detectron2's ROIAlignV2) when True.
      min_level: pyramid level of features[0].
      canonical_size, canonical_level, level_rule: see `assign_levels`.
      adaptive_cap: with sampling_ratio=0, the most samples per bin and axis.
      impl: 'gather', 'matmul' or 'auto' (see the module docstring).
      with_gradient: whether the caller differentiates the result; 'auto'
        takes the gather form when it does not (see `choose_impl`).

    Returns:
      [R, output_size, output_size, C].
    """
    if impl not in IMPLS:
        raise ValueError(f'unknown RoIAlign impl {impl!r}; expected one of {IMPLS}')
    if sampling_ratio < 0 or (sampling_ratio == 0 and not adaptive_cap):
        raise ValueError(f'sampling_ratio must be positive, or 0 (adaptive) with a positive '
                         f'adaptive_cap for static shapes; got sampling_ratio={sampling_ratio}, '
                         f'adaptive_cap={adaptive_cap}')
    num_levels = len(features)
    channels = features[0].shape[-1]
    heights = jnp.asarray([f.shape[0] for f in features])
    widths = jnp.asarray([f.shape[1] for f in features])

    level = assign_levels(boxes, min_level, min_level + num_levels - 1,
                          canonical_size, canonical_level, level_rule) - min_level
    scale = 1.0 / jnp.asarray(strides, jnp.float32)[level]
    shift = 0.5 if aligned else 0.0
    x0 = boxes[:, 0] * scale - shift
    y0 = boxes[:, 1] * scale - shift
    bw = boxes[:, 2] * scale - shift - x0
    bh = boxes[:, 3] * scale - shift - y0
    if not aligned:  # torchvision's legacy mode forces boxes to at least 1x1.
        bw = jnp.maximum(bw, 1.0)
        bh = jnp.maximum(bh, 1.0)
    if sampling_ratio > 0:
        slots, count_y, count_x = sampling_ratio, None, None
    else:
        slots = adaptive_cap
        count_y = jnp.minimum(jnp.ceil(bh / output_size), adaptive_cap)
        count_x = jnp.minimum(jnp.ceil(bw / output_size), adaptive_cap)
    h_l, w_l = heights[level], widths[level]
    y_lo, y_hi, wy_lo, wy_hi = _axis_samples(y0, bh, output_size, slots, h_l, count_y)
    x_lo, x_hi, wx_lo, wx_hi = _axis_samples(x0, bw, output_size, slots, w_l, count_x)

    if impl == 'auto':
        impl = choose_impl([f.shape for f in features], output_size, slots, with_gradient)
    if impl == 'matmul':
        # Rows of all levels stacked, each padded to the widest level.
        max_w = max(f.shape[1] for f in features)
        rows = jnp.concatenate(
            [jnp.pad(f, ((0, 0), (0, max_w - f.shape[1]), (0, 0))) for f in features], axis=0)
        row_offsets = jnp.asarray([0] + [f.shape[0] for f in features[:-1]]).cumsum()
        first_row = row_offsets[level][:, None]
        # float32 weights, as the gather form's: low-precision features give a float32 result.
        a_y = _interpolation_matrix(y_lo + first_row, y_hi + first_row, wy_lo, wy_hi,
                                    output_size, slots, rows.shape[0])
        a_x = _interpolation_matrix(x_lo, x_hi, wx_lo, wx_hi, output_size, slots, max_w)
        # One [R*bins, rows] x [rows, W*C] matmul; written as a 2-D product so that its
        # gradient is one too (an einsum's transposed layout cost 2.5x on CPU).
        r, y, x, c = a_y.shape[0], rows.shape[0], max_w, channels
        by_rows = (a_y.reshape(r * output_size, y) @ rows.reshape(y, x * c)).reshape(
            r, output_size, x, c)
        # The columns: R small matmuls. (A broadcast product and sum is faster alone,
        # but inside the training step XLA:CPU materialised the [R, bins, bins, W, C]
        # product, 10x slower.)
        return jnp.einsum('rjx,rixc->rijc', a_x, by_rows)

    table = jnp.concatenate([f.reshape(-1, channels) for f in features], axis=0)
    offsets = jnp.asarray(
        [0] + [f.shape[0] * f.shape[1] for f in features[:-1]]).cumsum()

    r = boxes.shape[0]

    def entries(low, high, w_low, w_high):  # [R, S, 2 * slots] indices and weights
        pairs = lambda a, b: jnp.stack([a.reshape(r, output_size, slots),
                                        b.reshape(r, output_size, slots)], -1).reshape(
                                            r, output_size, 2 * slots)
        return pairs(low, high), pairs(w_low, w_high)

    ys, wys = entries(y_lo, y_hi, wy_lo, wy_hi)
    xs, wxs = entries(x_lo, x_hi, wx_lo, wx_hi)
    rows = offsets[level][:, None, None] + ys * w_l[:, None, None]
    return _separable_gather_sum(table, rows, xs, wys, wxs)


def _pairings(rows, cols, w_rows, w_cols):
    """Per (ky, kx) pairing: the [R, S, S] table indices and weights it reads."""
    for ky in range(rows.shape[-1]):
        for kx in range(cols.shape[-1]):
            yield (ky, kx, rows[:, :, None, ky] + cols[:, None, :, kx],
                   w_rows[:, :, None, ky] * w_cols[:, None, :, kx])


@jax.custom_vjp
def _separable_gather_sum(table, rows, cols, w_rows, w_cols):
    """out[r, i, j] = sum over ky, kx of w_rows[r, i, ky] * w_cols[r, j, kx]
    * table[rows[r, i, ky] + cols[r, j, kx]]: [R, S, S, C] in float32.

    Each bin reads (2 * slots)^2 table rows, every pairing of its samples' y and x
    corners. One gather per pairing, summed with its weight, lets XLA fuse the
    gathers and the sum into one loop that writes only the result; gathering the
    [R, P, P, C] corner arrays and reducing them afterwards was 10x slower on CPU
    (benchmarks/roi_align_benchmark.py). The gradient is one chain of scatter-adds
    into a single table buffer (autodiff would give each gather its own zeroed
    table-sized buffer and add them all).
    """
    out = None
    for _, _, idx, w in _pairings(rows, cols, w_rows, w_cols):
        term = table[idx] * w[..., None]
        out = term if out is None else out + term
    return out


def _separable_gather_sum_fwd(table, rows, cols, w_rows, w_cols):
    return (_separable_gather_sum(table, rows, cols, w_rows, w_cols),
            (table, rows, cols, w_rows, w_cols))


def _separable_gather_sum_bwd(residuals, dy):
    table, rows, cols, w_rows, w_cols = residuals
    d_table = jnp.zeros(table.shape, jnp.float32)
    d_w_rows = jnp.zeros(w_rows.shape, jnp.float32)
    d_w_cols = jnp.zeros(w_cols.shape, jnp.float32)
    for ky, kx, idx, w in _pairings(rows, cols, w_rows, w_cols):
        d_table = d_table.at[idx].add(dy * w[..., None])
        # The weights' gradients; dead code (removed by XLA) when boxes are constants.
        d_w = (dy * table[idx]).sum(-1)
        d_w_rows = d_w_rows.at[:, :, ky].add((d_w * w_cols[:, None, :, kx]).sum(2))
        d_w_cols = d_w_cols.at[:, :, kx].add((d_w * w_rows[:, :, None, ky]).sum(1))
    return (d_table.astype(table.dtype), None, None, d_w_rows.astype(w_rows.dtype),
            d_w_cols.astype(w_cols.dtype))


_separable_gather_sum.defvjp(_separable_gather_sum_fwd, _separable_gather_sum_bwd)


def crop_and_resize_masks(masks: jnp.ndarray, mask_boxes: jnp.ndarray,
                          crop_boxes: jnp.ndarray, output_size: int) -> jnp.ndarray:
    """Resamples box-aligned masks onto other boxes.

    The ground-truth masks come from the host already cropped to their own box
    (`mask_boxes`) at a fixed S x S resolution; a mask target for an RoI reads
    that crop at the RoI's box, one bilinear sample per output pixel centre.

    Args:
      masks: [R, S, S] crops, pixel (i, j) covering the (i, j) cell of its box.
      mask_boxes: [R, 4] xyxy boxes the crops cover.
      crop_boxes: [R, 4] xyxy boxes to read.
      output_size: side of the result.

    Returns:
      [R, output_size, output_size] in [0, 1]; zero outside the mask box.
    """
    s = masks.shape[-1]
    mw = jnp.maximum(mask_boxes[:, 2] - mask_boxes[:, 0], 1e-6)
    mh = jnp.maximum(mask_boxes[:, 3] - mask_boxes[:, 1], 1e-6)
    # Crop box in the crop's pixel units, where pixel centres sit at k + 0.5.
    x0 = (crop_boxes[:, 0] - mask_boxes[:, 0]) / mw * s - 0.5
    y0 = (crop_boxes[:, 1] - mask_boxes[:, 1]) / mh * s - 0.5
    bw = (crop_boxes[:, 2] - crop_boxes[:, 0]) / mw * s
    bh = (crop_boxes[:, 3] - crop_boxes[:, 1]) / mh * s
    limit = jnp.full(masks.shape[:1], s)
    y_lo, y_hi, wy_lo, wy_hi = _axis_samples(y0, bh, output_size, 1, limit)
    x_lo, x_hi, wx_lo, wx_hi = _axis_samples(x0, bw, output_size, 1, limit)

    # Unlike features, a mask is zero past its box edges (-0.5 and s - 0.5 here);
    # the feature-map border rule of `_axis_samples` would extend the edge pixel.
    def inside(start, length):
        centres = (jnp.arange(output_size) + 0.5)[None, :] * (length / output_size)[:, None]
        coord = start[:, None] + centres
        return ((coord >= -0.5) & (coord <= s - 0.5)).astype(masks.dtype)

    in_y, in_x = inside(y0, bh), inside(x0, bw)
    wy_lo, wy_hi, wx_lo, wx_hi = wy_lo * in_y, wy_hi * in_y, wx_lo * in_x, wx_hi * in_x

    def one(mask, ylo, yhi, wylo, wyhi, xlo, xhi, wxlo, wxhi):
        rows = mask[ylo] * wylo[:, None] + mask[yhi] * wyhi[:, None]   # [P, S]
        return rows[:, xlo] * wxlo[None, :] + rows[:, xhi] * wxhi[None, :]

    return jax.vmap(one)(masks, y_lo, y_hi, wy_lo, wy_hi, x_lo, x_hi, wx_lo, wx_hi)
