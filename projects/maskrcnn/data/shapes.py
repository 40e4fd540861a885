"""Procedural "shapes" instance-segmentation dataset, written as COCO-format files.

Each image has a textured background (colour gradients, blocky pixel noise, stripes,
checkerboards, or a blend of two) and 1..max_shapes filled circles, rectangles and
triangles with random size (about 10 % to 50 % of the image side), position (shapes may
leave the image), rotation and colour. Shapes are drawn in order, so later shapes occlude
earlier ones; every instance's mask is its *visible* part.

A placement that would hide too much of an earlier shape is re-drawn a few times (and the
shape skipped if no placement works), so that every visible shape is annotated. An instance
is kept only if at least `_MIN_VISIBLE_FRACTION` of its in-image area and at least
`_MIN_PIXELS` pixels remain visible.

Rendering is analytic: shapes are sampled on a supersampled grid (`_SUPERSAMPLE` per axis)
inside their bounding window, which gives anti-aliased edges for the image and a coverage
map whose >= 0.5 region is the binary mask.

Output layout (`generate_shapes_coco`):
  out_dir/train/000001.png ...          out_dir/val/000001.png ...
  out_dir/annotations/instances_train.json, out_dir/annotations/instances_val.json
"""

import json
import multiprocessing
import multiprocessing.pool
import os
import zlib
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = ({'id': 1, 'name': 'circle', 'supercategory': 'shape'},
              {'id': 2, 'name': 'rectangle', 'supercategory': 'shape'},
              {'id': 3, 'name': 'triangle', 'supercategory': 'shape'})
_SPLITS = ('train', 'val')

_SUPERSAMPLE = 4
_MIN_VISIBLE_FRACTION = 0.35
_MIN_PIXELS = 30
_MAX_PLACEMENT_TRIES = 8
_MAX_COLOUR_TRIES = 8
_MIN_COLOUR_DISTANCE = 90.0  # Euclidean RGB distance to the local background mean.

Window = tuple[slice, slice]  # (rows, cols) of an image


# ----------------------------------------------------------------------------- geometry


def _coverage(shape: tuple[str, Any], size: int) -> tuple[Window, np.ndarray]:
    """Fraction of each pixel covered by a shape, inside the shape's bounding window.

    Args:
        shape: ('circle', (cx, cy, r)) or ('polygon', vertices float [n, 2] as (x, y),
            convex, either orientation), in continuous pixel coordinates (pixel (i, j)
            spans [j, j + 1] x [i, i + 1]).
        size: image side.

    Returns:
        (window, coverage): `window` is a (rows, cols) pair of slices of the image and
        `coverage` float32 [h, w] in [0, 1] over that window; `h` or `w` is 0 when the
        shape lies outside the image.
    """
    kind, params = shape
    if kind == 'circle':
        cx, cy, r = params
        lo_x, hi_x, lo_y, hi_y = cx - r, cx + r, cy - r, cy + r
    else:
        verts = np.asarray(params, np.float64)
        (lo_x, lo_y), (hi_x, hi_y) = verts.min(0), verts.max(0)
    x0, x1 = max(int(np.floor(lo_x)), 0), min(int(np.ceil(hi_x)), size)
    y0, y1 = max(int(np.floor(lo_y)), 0), min(int(np.ceil(hi_y)), size)
    x1, y1 = max(x0, x1), max(y0, y1)
    ss = _SUPERSAMPLE
    xs = (x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss)[None, :]
    ys = (y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss)[:, None]
    if kind == 'circle':
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    else:
        # Orient counter-clockwise (positive signed area) so the interior is on the left.
        nxt = np.roll(verts, -1, axis=0)
        if np.sum(verts[:, 0] * nxt[:, 1] - nxt[:, 0] * verts[:, 1]) < 0:
            verts = verts[::-1]
            nxt = np.roll(verts, -1, axis=0)
        inside = np.ones((ys.shape[0], xs.shape[1]), bool)
        for (ax, ay), (bx, by) in zip(verts, nxt):
            inside &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
    cov = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)
    return (slice(y0, y1), slice(x0, x1)), cov


def _random_shape(rng: np.random.Generator, size: int) -> tuple[int, tuple[str, Any]]:
    """Draws a category id and a shape (see `_coverage`) of side ~10 %..50 % of `size`."""
    category_id = int(rng.integers(1, len(CATEGORIES) + 1))
    side = rng.uniform(0.1, 0.5) * size
    cx, cy = rng.uniform(0, size, 2)
    if category_id == 1:
        return category_id, ('circle', (cx, cy, side / 2))
    if category_id == 2:
        w, h = side, side * rng.uniform(0.4, 1.0)
        theta = rng.uniform(0, np.pi)
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    else:
        # Jittered equilateral triangle: varied but never degenerate.
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3
        angles += rng.uniform(-0.35, 0.35, 3)
        radii = side / 2 * rng.uniform(0.75, 1.0, 3)
        corners = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        theta = 0.0
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return category_id, ('polygon', corners @ rot.T + [cx, cy])


# ---------------------------------------------------------------------------- rendering


def _random_pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """One background texture, float32 [size, size, 3] in RGB 0..255 units."""
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    # Second colour near or far from the first: low- and high-contrast textures.
    c1 = np.clip(c0 + rng.uniform(-1, 1, 3) * rng.uniform(30, 160), 0, 255)
    coords = np.arange(size, dtype=np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = coords[None, :] * cos + coords[:, None] * sin
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        t = (u - u.min()) / max(u.max() - u.min(), 1e-6)
    elif kind == 1:  # blocky pixel noise
        block = int(rng.choice([1, 2, 4, 8]))
        cells = rng.random((-(-size // block),) * 2, dtype=np.float32)
        t = cells.repeat(block, axis=0).repeat(block, axis=1)[:size, :size]
    elif kind == 2:  # stripes, soft or hard
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 16) * u + rng.uniform(0, 6.3))
        if rng.random() < 0.5:
            t = np.round(t)
    else:  # checkerboard
        freq = np.float32(rng.uniform(2, 12))
        v = coords[:, None] * cos - coords[None, :] * sin
        t = (np.floor(freq * u) + np.floor(freq * v)) % 2
    t = t.astype(np.float32)[..., None]
    return c0 + t * (c1 - c0).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random texture, sometimes a blend of two; float32 [size, size, 3]."""
    bg = _random_pattern(rng, size)
    if rng.random() < 0.5:
        alpha = rng.uniform(0.3, 0.7)
        bg = (1 - alpha) * bg + alpha * _random_pattern(rng, size)
    return bg


def _contrasting_colour(rng: np.random.Generator, pixels: np.ndarray) -> np.ndarray:
    """Random colour far from the mean of `pixels` [n, 3] (best of a few draws)."""
    local_mean = pixels.mean(axis=0)
    best, best_dist = None, -1.0
    for _ in range(_MAX_COLOUR_TRIES):
        colour = rng.uniform(0, 255, 3)
        dist = float(np.linalg.norm(colour - local_mean))
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist >= _MIN_COLOUR_DISTANCE:
            break
    return best.astype(np.float32)


def _visible_enough(visible: int, full_area: int) -> bool:
    return visible >= max(_MIN_VISIBLE_FRACTION * full_area, _MIN_PIXELS)


def render_shapes_image(rng: np.random.Generator, size: int,
                        max_shapes: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Renders one image and its visible instance masks.

    Args:
        rng: random generator, advanced by this call.
        size: image side in pixels.
        max_shapes: at most this many shapes are attempted (at least one).

    Returns:
        (image uint8 [size, size, 3], [(category_id, visible mask bool [size, size]), ...])
        in drawing order; the masks do not overlap.
    """
    canvas = _background(rng, size)
    owner = np.full((size, size), -1, np.int32)  # index of the shape visible at each pixel
    drawn = []  # (category_id, full in-image area, visible area)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _ in range(_MAX_PLACEMENT_TRIES):
            category_id, shape = _random_shape(rng, size)
            window, cov = _coverage(shape, size)
            mask = cov >= 0.5
            area = int(np.count_nonzero(mask))
            if area < _MIN_PIXELS:
                continue
            # Pixels of each earlier shape that this placement would hide.
            hidden = np.bincount(owner[window][mask] + 1, minlength=len(drawn) + 1)[1:]
            if all(_visible_enough(vis - h, full)
                   for (_, full, vis), h in zip(drawn, hidden)):
                break
        else:
            continue  # no placement keeps the earlier shapes visible: skip this shape
        colour = _contrasting_colour(rng, canvas[window][mask])
        alpha = cov[..., None]
        canvas[window] = canvas[window] * (1 - alpha) + colour * alpha
        owner[window][mask] = len(drawn)
        drawn = [(c, full, vis - h) for (c, full, vis), h in zip(drawn, hidden)]
        drawn.append((category_id, area, area))
    sigma = np.float32(rng.uniform(0, 6))
    canvas += sigma * rng.standard_normal(canvas.shape, dtype=np.float32)  # sensor noise
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    instances = [(cat, owner == i) for i, (cat, full, vis) in enumerate(drawn)
                 if _visible_enough(vis, full)]
    return image, instances


# ------------------------------------------------------------------------------ writing


def _render_and_write(task: tuple[int, int, int, str, int, int]) -> list[tuple[int, dict]]:
    """Renders image `image_id` of a split, writes its PNG; returns (category, RLE) pairs."""
    seed, split_index, image_id, image_dir, image_size, max_shapes = task
    # One stream per image: the result does not depend on how work is split over processes.
    seed_seq = np.random.SeedSequence(seed, spawn_key=(split_index, image_id))
    rng = np.random.default_rng(seed_seq)
    image, instances = render_shapes_image(rng, image_size, max_shapes)
    # Run-length zlib: faster and smaller than the default on these noisy images.
    Image.fromarray(image).save(os.path.join(image_dir, f'{image_id:06d}.png'),
                                compress_level=1, compress_type=zlib.Z_RLE)
    return [(cat, mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
            for cat, mask in instances]


def _annotation(ann_id: int, image_id: int, category_id: int, rle: dict) -> dict:
    """COCO annotation entry; bbox and area come from the (visible) mask's RLE."""
    return {
        'id': ann_id,
        'image_id': image_id,
        'category_id': category_id,
        'segmentation': {'size': [int(s) for s in rle['size']],
                         'counts': rle['counts'].decode('ascii')},
        'area': float(mask_utils.area(rle)),
        'bbox': [float(v) for v in mask_utils.toBbox(rle)],
        'iscrowd': 0,
    }


def _write_split(pool: multiprocessing.pool.Pool | None, tasks: list[tuple],
                 split: str, out_dir: str, image_size: int) -> tuple[str, str]:
    """Renders `tasks` (see `_render_and_write`) and writes the split's COCO JSON."""
    results = pool.imap(_render_and_write, tasks, chunksize=16) if pool else map(
        _render_and_write, tasks)
    images, annotations = [], []
    for image_id, instances in enumerate(results, start=1):
        images.append({'id': image_id, 'file_name': f'{image_id:06d}.png',
                       'height': image_size, 'width': image_size})
        for category_id, rle in instances:
            annotations.append(_annotation(len(annotations) + 1, image_id, category_id, rle))
    coco = {
        'info': {'description': f'Detectax procedural shapes ({split})'},
        'licenses': [],
        'images': images,
        'annotations': annotations,
        'categories': [dict(c) for c in CATEGORIES],
    }
    json_path = os.path.join(out_dir, 'annotations', f'instances_{split}.json')
    with open(json_path, 'w') as f:
        json.dump(coco, f)
    return json_path, os.path.join(out_dir, split)


def generate_shapes_coco(out_dir: str, *, num_train: int, num_val: int,
                         image_size: int = 128, seed: int = 0, max_shapes: int = 6,
                         num_workers: int = 0) -> dict[str, tuple[str, str]]:
    """Writes the shapes dataset as PNG images plus COCO instance JSON files.

    Fully determined by the arguments other than `num_workers`: every image draws from its
    own random stream derived from (`seed`, split, image id), so train and val differ and
    the output does not depend on the number of worker processes.

    Args:
        out_dir: output folder (created; existing files are overwritten).
        num_train: number of training images.
        num_val: number of validation images.
        image_size: side of the square images in pixels.
        seed: random seed.
        max_shapes: each image gets 1..max_shapes shapes (fewer if they do not fit).
        num_workers: rendering processes forked from this one (0 or 1: render here). Fork
            them before JAX starts its threads: JAX warns about any later fork, although
            the workers only run numpy, PIL and pycocotools.

    Returns:
        {'train': (json_path, image_dir), 'val': (json_path, image_dir)}.
    """
    if max_shapes < 1:
        raise ValueError(f'max_shapes must be >= 1, got {max_shapes}.')
    counts = {'train': num_train, 'val': num_val}
    os.makedirs(os.path.join(out_dir, 'annotations'), exist_ok=True)
    pool = None
    if num_workers > 1 and 'fork' in multiprocessing.get_all_start_methods():
        # 'fork' needs no importable __main__ (unlike 'spawn'); the workers never touch
        # TensorFlow or JAX, which the caller may have loaded.
        pool = multiprocessing.get_context('fork').Pool(num_workers)
    try:
        out = {}
        for split_index, split in enumerate(_SPLITS):
            image_dir = os.path.join(out_dir, split)
            os.makedirs(image_dir, exist_ok=True)
            tasks = [(seed, split_index, i, image_dir, image_size, max_shapes)
                     for i in range(1, counts[split] + 1)]
            out[split] = _write_split(pool, tasks, split, out_dir, image_size)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return out
