"""Tests of the per-example transforms and the tf.data pipeline (CONVENTIONS.md batch)."""

import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from projects.maskrcnn.data import input_pipeline as ip
from projects.maskrcnn.data import transforms

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
COMMON = dict(image_size=(64, 64), max_size=64, pixel_mean=MEAN, pixel_std=STD,
              max_instances=6, gt_mask_size=14)


def _expected_spec(batch, m=6, s=14, h=64, w=64):
    return {
        'image': ('float32', (batch, h, w, 3)), 'image_id': ('int32', (batch,)),
        'orig_size': ('int32', (batch, 2)), 'image_size': ('int32', (batch, 2)),
        'image_scale': ('float32', (batch,)), 'gt_boxes': ('float32', (batch, m, 4)),
        'gt_classes': ('int32', (batch, m)), 'gt_valid': ('bool', (batch, m)),
        'gt_has_mask': ('bool', (batch, m)),
        'gt_masks': ('float32', (batch, m, s, s)), 'gt_truncated': ('int32', (batch,)),
        'batch_mask': ('float32', (batch,)),
    }


def _spec(batch):
    return {k: (np.asarray(v).dtype.name, np.asarray(v).shape) for k, v in batch.items()}


def _example(boxes, masks, labels=None, crowd=None, height=40, width=60, encode=False):
    """An in-memory coco_builder example with decoded (or PNG-encoded) masks."""
    n = len(boxes)
    rng = np.random.default_rng(0)
    masks = np.asarray(masks, np.uint8).reshape(n, height, width, 1)
    if encode:
        pngs = []
        for m in masks:
            buffer = io.BytesIO()
            Image.fromarray(m[..., 0], mode='L').save(buffer, format='png')
            pngs.append(buffer.getvalue())
        mask_tensor = tf.constant(pngs, tf.string, shape=[n])
    else:
        mask_tensor = tf.constant(masks)
    return {
        'image': tf.constant(rng.integers(0, 256, (height, width, 3), np.uint8)),
        'image/id': tf.constant(5, tf.int64),
        'objects': {
            'bbox': tf.constant(np.asarray(boxes, np.float32).reshape(n, 4)),
            'label': tf.constant(labels if labels is not None else [0] * n, tf.int64),
            'is_crowd': tf.constant(crowd if crowd is not None else [False] * n, tf.bool),
            'mask': mask_tensor,
        },
    }


def _rect_mask(x1, y1, x2, y2, height=40, width=60):
    mask = np.zeros((height, width), np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def _np(d):
    return {k: np.asarray(v) for k, v in d.items()}


def test_train_and_eval_batches_follow_conventions(shapes_builder):
    train = ip.build_train_dataset(shapes_builder, split='train', batch_size=3, seed=0,
                                   train_min_sizes=(48, 64), horizontal_flip=True, **COMMON)
    batch = next(iter(tfds.as_numpy(train)))
    assert _spec(batch) == _expected_spec(3)
    assert (batch['batch_mask'] == 1).all() and batch['gt_valid'].any()
    assert ((batch['gt_classes'] > 0) == batch['gt_valid']).all()
    assert batch['gt_masks'].min() >= 0 and batch['gt_masks'].max() <= 1
    evals = list(tfds.as_numpy(ip.build_eval_dataset(
        shapes_builder, split='val', batch_size=2, eval_min_size=64, **COMMON)))
    assert all(_spec(b) == _expected_spec(2) for b in evals)


def test_flip_flips_image_boxes_and_masks_together():
    mask = _rect_mask(10, 5, 40, 30)
    mask[5:15, 10:20] = 0  # notch: the mask is not left-right symmetric in its box
    example = _example([[10, 5, 40, 30]], [mask], labels=[2])
    kwargs = dict(min_size=40, max_size=60, image_size=(48, 64), pixel_mean=MEAN,
                  pixel_std=STD, max_instances=3, gt_mask_size=12, drop_invalid=True)
    plain = _np(transforms.resize_and_pad_example(example, flip=False, **kwargs))
    flipped = _np(transforms.resize_and_pad_example(example, flip=True, **kwargs))
    new_h, new_w = plain['image_size']
    assert (new_h, new_w) == (40, 60)
    np.testing.assert_array_equal(flipped['image'][:new_h, :new_w],
                                  plain['image'][:new_h, :new_w][:, ::-1])
    assert not flipped['image'][:, new_w:].any() and not flipped['image'][new_h:].any()
    np.testing.assert_allclose(plain['gt_boxes'][0], [10, 5, 40, 30])
    np.testing.assert_allclose(flipped['gt_boxes'][0], [20, 5, 50, 30])
    assert not np.allclose(plain['gt_masks'][0], plain['gt_masks'][0][:, ::-1])
    np.testing.assert_allclose(flipped['gt_masks'][0], plain['gt_masks'][0][:, ::-1])
    np.testing.assert_array_equal(flipped['gt_classes'], [3, 0, 0])


@pytest.mark.parametrize('encode', [False, True])
def test_mask_crop_of_known_rectangle(encode):
    example = _example([[20, 10, 50, 30], [20, 10, 80, 30]],
                       [_rect_mask(20, 10, 50, 30, width=80)] * 2, height=40, width=80,
                       encode=encode)
    objects = example['objects']
    crops = transforms.crop_masks(objects['mask'], objects['bbox'], 40, 80, 14).numpy()
    assert crops.shape == (2, 14, 14)
    np.testing.assert_allclose(crops[0], 1.0)
    # A box twice as wide as the object: the object fills exactly the left 7 bins (bin
    # centres at 20 + (j + 0.5) * 60 / 14 lie inside it for j < 7).
    np.testing.assert_allclose(crops[1][:, :7], 1.0)
    np.testing.assert_allclose(crops[1][:, 7:], 0.0)


def test_mask_crop_upsampling_at_the_image_border():
    mask = _rect_mask(0, 0, 4, 4)
    crops = transforms.crop_masks(tf.constant(mask[None, ..., None]), tf.constant([[0., 0, 4, 4]]),
                          40, 60, 16).numpy()
    # The image-border side samples up to half a pixel outside the mask; clamping makes
    # them read the border pixel (1) instead of zero padding. The inner side is bilinear.
    np.testing.assert_allclose(crops[0][:13, :13], 1.0)
    assert 0.3 < crops[0][-1, -1] < 1.0


def test_ops_give_the_same_result_eagerly_and_in_tf_data(shapes_builder):
    ds = shapes_builder.as_dataset(split='train', decoders=ip.SKIP_DECODING).take(2)
    train_kwargs = dict(train_min_sizes=(40, 48, 64), horizontal_flip=True, **COMMON)
    eval_kwargs = dict(eval_min_size=48, **COMMON)
    seed = tf.constant([3, 4], tf.int64)
    graph = list(ds.map(lambda ex: (ip.preprocess_for_train(ex, seed=seed, **train_kwargs),
                                    ip.preprocess_for_eval(ex, **eval_kwargs))))
    for example, (graph_train, graph_eval) in zip(ds, graph):
        eager_train = ip.preprocess_for_train(example, seed=seed, **train_kwargs)
        eager_eval = ip.preprocess_for_eval(example, **eval_kwargs)
        for eager, in_graph in ((eager_train, graph_train), (eager_eval, graph_eval)):
            assert set(eager) == set(in_graph)
            for key in eager:
                np.testing.assert_allclose(eager[key], in_graph[key], atol=1e-5, err_msg=key)
    assert graph[0][1]['gt_valid'].numpy().any()


def test_augmentation_is_seeded_and_covers_all_choices():
    example = _example([[10, 5, 40, 30]], [_rect_mask(10, 5, 40, 30)])
    kwargs = dict(train_min_sizes=(20, 30, 40), horizontal_flip=True, **COMMON)
    sizes, lefts = set(), set()
    for i in range(24):
        seed = tf.constant([0, i], tf.int64)
        out = _np(ip.preprocess_for_train(example, seed=seed, **kwargs))
        again = _np(ip.preprocess_for_train(example, seed=seed, **kwargs))
        for key in out:
            np.testing.assert_array_equal(out[key], again[key])
        sizes.add(tuple(out['image_size']))
        lefts.add(round(float(out['gt_boxes'][0, 0] / out['image_scale']), 3))
    assert sizes == {(20, 30), (30, 45), (40, 60)}
    assert lefts == {10.0, 20.0}  # unflipped and flipped left edge, original pixels


def test_train_stream_is_deterministic(shapes_builder):
    def first_batches(seed):
        ds = ip.build_train_dataset(shapes_builder, split='train', batch_size=4, seed=seed,
                                    train_min_sizes=(40, 64), horizontal_flip=True,
                                    **COMMON)
        return list(tfds.as_numpy(ds.take(4)))

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x['image'], z['image']) for x, z in zip(a, c))
    # Twelve examples, batches of four: the second epoch starts at batch 3, reshuffled.
    ids = [b['image_id'].tolist() for b in a]
    assert sorted(sum(ids[:3], [])) == list(range(1, 13))
    assert ids[3] != ids[0]


def test_train_stream_is_split_between_processes(shapes_builder):
    epochs = []
    for index in range(2):
        ds = ip.build_train_dataset(shapes_builder, split='train', batch_size=3, seed=0,
                                    train_min_sizes=(64,), horizontal_flip=False,
                                    process_index=index, process_count=2, **COMMON)
        epochs.append(sorted(i for b in tfds.as_numpy(ds.take(2)) for i in b['image_id']))
    assert epochs == [list(range(1, 7)), list(range(7, 13))]


def test_eval_is_in_order_and_last_batch_is_padded(shapes_builder):
    batches = list(tfds.as_numpy(ip.build_eval_dataset(
        shapes_builder, split='val', batch_size=2, eval_min_size=64, **COMMON)))
    assert [b['image_id'].tolist() for b in batches] == [[1, 2], [3, 4], [5, 0]]
    assert [b['batch_mask'].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    last = batches[-1]
    for key, value in last.items():
        assert not value[1].any(), key
    # Two processes: equal batch counts, together every example once.
    per_process = [list(tfds.as_numpy(ip.build_eval_dataset(
        shapes_builder, split='val', batch_size=2, eval_min_size=64, process_index=i,
        process_count=2, **COMMON))) for i in range(2)]
    assert [len(p) for p in per_process] == [2, 2]
    ids = [i for p in per_process for b in p for i, m in zip(b['image_id'], b['batch_mask'])
           if m]
    assert sorted(ids) == [1, 2, 3, 4, 5]


def test_crowd_and_empty_boxes_dropped_for_train_kept_invalid_for_eval():
    boxes = [[1, 1, 11, 11], [2, 2, 12, 12], [5, 5, 5, 15], [20, 20, 30, 35]]
    masks = [_rect_mask(*map(int, b)) for b in boxes]
    example = _example(boxes, masks, labels=[0, 1, 2, 3], crowd=[False, True, False, False])
    train = _np(ip.preprocess_for_train(example, seed=tf.constant([0, 0]),
                                        train_min_sizes=(40,), horizontal_flip=False,
                                        **COMMON))
    np.testing.assert_array_equal(train['gt_classes'], [1, 4, 0, 0, 0, 0])
    np.testing.assert_array_equal(train['gt_valid'], [1, 1, 0, 0, 0, 0])
    evals = _np(ip.preprocess_for_eval(example, eval_min_size=40, **COMMON))
    np.testing.assert_array_equal(evals['gt_classes'], [1, 2, 3, 4, 0, 0])
    np.testing.assert_array_equal(evals['gt_valid'], [1, 0, 0, 1, 0, 0])
    assert not train['gt_boxes'][2:].any() and not train['gt_masks'][2:].any()


def test_keeps_the_first_max_instances():
    boxes = [[i, i, i + 10, i + 10] for i in range(8)]
    example = _example(boxes, [_rect_mask(*b) for b in boxes], labels=list(range(8)))
    out = _np(ip.preprocess_for_eval(example, eval_min_size=40, **COMMON))
    np.testing.assert_array_equal(out['gt_classes'], [1, 2, 3, 4, 5, 6])
    assert out['gt_valid'].all()


@pytest.mark.parametrize('min_size,max_size,image_size,scale,size', [
    (20, 1000, (64, 64), 0.5, (20, 30)),       # shortest side rule
    (40, 45, (64, 64), 0.75, (30, 45)),        # longest side cap
    (80, 1000, (64, 64), 64 / 60, (43, 64)),   # never larger than the padded size
])
def test_resize_rules(min_size, max_size, image_size, scale, size):
    example = _example([[6, 4, 30, 20]], [_rect_mask(6, 4, 30, 20)])
    out = _np(transforms.resize_and_pad_example(
        example, min_size=min_size, max_size=max_size, flip=False, image_size=image_size,
        pixel_mean=MEAN, pixel_std=STD, max_instances=2, gt_mask_size=8,
        drop_invalid=True))
    np.testing.assert_allclose(out['image_scale'], scale, rtol=1e-6)
    np.testing.assert_array_equal(out['image_size'], size)
    np.testing.assert_array_equal(out['orig_size'], [40, 60])
    np.testing.assert_allclose(out['gt_boxes'][0], np.array([6, 4, 30, 20]) * scale,
                               rtol=1e-5)
    resized = tf.image.resize(example['image'], size).numpy()
    np.testing.assert_allclose(out['image'][:size[0], :size[1]],
                               (resized - MEAN) / STD, atol=1e-4)
    assert not out['image'][size[0]:].any() and not out['image'][:, size[1]:].any()
    assert out['image_id'] == 5


@pytest.mark.parametrize('encode', [False, True])
def test_image_without_instances(encode):
    example = _example([], np.zeros((0, 40, 60, 1)), encode=encode)
    out = _np(ip.preprocess_for_train(example, seed=tf.constant([1, 1]),
                                      train_min_sizes=(40,), horizontal_flip=True, **COMMON))
    assert _spec({k: v[None] for k, v in out.items()}) == _expected_spec(1)
    assert not out['gt_valid'].any() and not out['gt_classes'].any()
    assert not out['gt_masks'].any() and not out['gt_boxes'].any()


def _notched_rect_example():
    """Instances in a 40x60 image: a rectangle whose left part is missing, one far left."""
    notched = _rect_mask(20, 10, 50, 30)
    notched[:, 20:30] = 0  # the box still spans x 20..50
    return _example([[20, 10, 50, 30], [0, 0, 8, 8]],
                    [notched, _rect_mask(0, 0, 8, 8)], labels=[1, 2])


def test_large_scale_jitter_crops_image_boxes_and_masks_together():
    example = _notched_rect_example()
    out = _np(transforms.large_scale_jitter_example(
        example, scale_factor=2.0, crop_fraction=tf.constant([0.5, 0.5]), flip=False,
        image_size=(64, 64), pixel_mean=MEAN, pixel_std=STD, max_instances=3,
        gt_mask_size=14))
    scale = 2.0 * 64 / 60  # fits 2x the padded size: the width binds
    np.testing.assert_allclose(out['image_scale'], scale, rtol=1e-6)
    # Resized to 85 x 128, leaving 21 x 64 pixels of room: the crop starts at (11, 32).
    resized = tf.image.resize(example['image'], (85, 128)).numpy()
    np.testing.assert_allclose(out['image'], (resized[11:75, 32:96] - MEAN) / STD, atol=1e-4)
    np.testing.assert_array_equal(out['image_size'], [64, 64])
    # The small instance lies left of the crop: dropped. The other is clipped at the crop's
    # right edge (original x 45), and its mask is cropped to the clipped box.
    np.testing.assert_array_equal(out['gt_classes'], [2, 0, 0])
    np.testing.assert_allclose(out['gt_boxes'][0],
                               [20 * scale - 32, 10 * scale - 11, 64, 30 * scale - 11],
                               rtol=1e-5)
    expected = transforms.crop_masks(example['objects']['mask'][:1],
                                     tf.constant([[20., 10, 45, 30]]), 40, 60, 14).numpy()[0]
    np.testing.assert_allclose(out['gt_masks'][0], expected, atol=1e-4)
    # Bin centres 20 + (j + 0.5) * 25 / 14 lie left of x = 30 (the notch) for j <= 5.
    np.testing.assert_allclose(out['gt_masks'][0][:, :5], 0.0)
    np.testing.assert_allclose(out['gt_masks'][0][:, 7:], 1.0)


def test_large_scale_jitter_below_the_padded_size_pads():
    example = _notched_rect_example()
    out = _np(transforms.large_scale_jitter_example(
        example, scale_factor=0.5, crop_fraction=tf.constant([0.9, 0.9]), flip=True,
        image_size=(64, 64), pixel_mean=MEAN, pixel_std=STD, max_instances=3,
        gt_mask_size=14))
    np.testing.assert_array_equal(out['image_size'], [21, 32])  # no crop at all
    assert not out['image'][21:].any() and not out['image'][:, 32:].any()
    scale = 32 / 60
    np.testing.assert_allclose(out['gt_boxes'][:2], np.array(  # flipped in the 32 columns
        [[32 - 50 * scale, 10 * scale, 32 - 20 * scale, 30 * scale],
         [32 - 8 * scale, 0, 32, 8 * scale]]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out['gt_valid'], [True, True, False])


def test_large_scale_jitter_in_training_is_seeded_and_spans_the_range():
    example = _notched_rect_example()
    kwargs = dict(train_min_sizes=(40,), horizontal_flip=True, large_scale_jitter=True,
                  lsj_scale_range=(0.5, 1.5), **COMMON)
    factors = []
    for i in range(12):
        seed = tf.constant([0, i], tf.int64)
        out = _np(ip.preprocess_for_train(example, seed=seed, **kwargs))
        again = _np(ip.preprocess_for_train(example, seed=seed, **kwargs))
        for key in out:
            np.testing.assert_array_equal(out[key], again[key], err_msg=key)
        factors.append(out['image_scale'] / (64 / 60))
    assert 0.5 <= min(factors) < 0.8 and 1.2 < max(factors) <= 1.5
    # In a tf.data map (graph mode) the result is the same as eagerly.
    seed = tf.constant([0, 3], tf.int64)
    eager = _np(ip.preprocess_for_train(example, seed=seed, **kwargs))
    ds = tf.data.Dataset.from_tensors(example).map(
        lambda ex: ip.preprocess_for_train(ex, seed=seed, **kwargs))
    graph = _np(next(iter(ds)))
    for key in eager:
        np.testing.assert_allclose(eager[key], graph[key], atol=1e-5, err_msg=key)


def test_bgr_channel_order_reverses_channels_before_normalising():
    example = _example([[10, 5, 40, 30]], [_rect_mask(10, 5, 40, 30)])
    kwargs = dict(eval_min_size=40, image_size=(64, 64), max_size=64, max_instances=2,
                  gt_mask_size=8)
    rgb = _np(ip.preprocess_for_eval(example, pixel_mean=MEAN, pixel_std=STD, **kwargs))
    msra_mean, msra_std = (103.53, 116.28, 123.675), (1.0, 1.0, 1.0)
    bgr = _np(ip.preprocess_for_eval(example, pixel_mean=msra_mean, pixel_std=msra_std,
                                     channel_order='BGR', **kwargs))
    pixels = rgb['image'][:40, :60] * STD + MEAN  # back to RGB 0-255
    np.testing.assert_allclose(bgr['image'][:40, :60], pixels[..., ::-1] - msra_mean,
                               atol=1e-3)
    with pytest.raises(ValueError, match='channel_order'):
        ip.preprocess_for_eval(example, pixel_mean=MEAN, pixel_std=STD, channel_order='bgr',
                               **kwargs)


def test_box_only_instances_are_flagged_and_get_their_box_as_mask():
    boxes = [[2, 2, 20, 20], [30, 10, 50, 30]]
    example = _example(boxes, [_rect_mask(5, 5, 10, 10), np.zeros((40, 60))], labels=[0, 1])
    example['objects']['has_mask'] = tf.constant([True, False])
    out = _np(ip.preprocess_for_train(example, seed=tf.constant([0, 0]),
                                      train_min_sizes=(40,), horizontal_flip=False, **COMMON))
    np.testing.assert_array_equal(out['gt_has_mask'], [True, False, False, False, False, False])
    np.testing.assert_array_equal(out['gt_valid'][:2], [True, True])
    np.testing.assert_allclose(out['gt_masks'][1], 1.0)
    assert 0 < out['gt_masks'][0].mean() < 0.5
    # Without the feature (datasets built before it) every instance has a mask.
    del example['objects']['has_mask']
    out = _np(ip.preprocess_for_eval(example, eval_min_size=40, **COMMON))
    np.testing.assert_array_equal(out['gt_has_mask'][:2], [True, True])
