"""visualization.py: drawn instances, prediction | ground-truth summaries, and the image
summaries a short training run writes to TensorBoard."""

import glob
import os

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers

from projects.maskrcnn import main as main_lib, predict, trainer, visualization
from projects.maskrcnn.model import MaskRCNNModel
from tests import tiny_shapes_config

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def test_draw_instances_fills_masks_and_leaves_the_rest():
    image = np.full((96, 128, 3), 128, np.uint8)
    masks = np.zeros((1, 96, 128), bool)
    masks[0, 40:60, 50:80] = True
    drawn = visualization.draw_instances(image, np.asarray([[40., 30., 90., 70.]]),
                                         np.asarray([2]), np.asarray([0.87]), masks,
                                         ['circle', 'rectangle'])
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert np.all(image == 128), 'the input must not be changed'
    assert np.abs(drawn[45:55, 60:70].astype(int) - 128).max() > 20      # mask blended
    assert np.abs(drawn[30, 55:75].astype(int) - 128).max() > 20         # top box edge
    np.testing.assert_array_equal(drawn[80:, :30], image[80:, :30])       # untouched
    assert visualization.captions(np.asarray([2, 7]), np.asarray([0.87, 0.5]),
                                  ['circle', 'rectangle']) == ['rectangle 0.87', 'class 7 0.50']
    empty = visualization.draw_instances(image, np.zeros((0, 4)), np.zeros(0, int))
    np.testing.assert_array_equal(empty, image)


def test_denormalise_undoes_the_pipeline_normalisation_in_either_channel_order():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    np.testing.assert_array_equal(visualization.denormalise((rgb - MEAN) / STD, MEAN, STD), rgb)
    bgr_mean = MEAN[::-1]
    bgr_input = (rgb[..., ::-1] - np.asarray(bgr_mean)) / 1.0
    np.testing.assert_array_equal(
        visualization.denormalise(bgr_input, bgr_mean, (1.0, 1.0, 1.0), 'BGR'), rgb)


def _batch_and_predictions():
    """Two examples (the second is padding) of a 64 x 48 image in a 64 x 64 batch."""
    pixels = np.full((64, 64, 3), 100.0, np.float32)
    batch = {
        'image': np.stack([(pixels - MEAN) / STD] * 2),
        'image_id': np.asarray([17, 0]),
        'image_size': np.asarray([[64, 48], [0, 0]]),
        'gt_boxes': np.zeros((2, 3, 4), np.float32),
        'gt_classes': np.zeros((2, 3), np.int32),
        'gt_masks': np.zeros((2, 3, 14, 14), np.float32),
        'batch_mask': np.asarray([1.0, 0.0]),
    }
    batch['gt_boxes'][0, 0] = [30, 40, 46, 62]     # bottom right
    batch['gt_classes'][0, 0] = 1
    batch['gt_masks'][0, 0] = 1.0
    predictions = {
        'detection_boxes': np.zeros((2, 2, 4), np.float32),
        'detection_scores': np.asarray([[0.9, 0.2], [0.0, 0.0]], np.float32),
        'detection_classes': np.asarray([[2, 1], [0, 0]], np.int32),
        'detection_valid': np.asarray([[True, True], [False, False]]),
        'detection_masks': np.ones((2, 2, 28, 28), np.float32),
    }
    predictions['detection_boxes'][0, 0] = [2, 2, 18, 22]   # top left, drawn
    predictions['detection_boxes'][0, 1] = [30, 2, 46, 22]  # top right, score below 0.5
    return batch, predictions


def test_eval_image_summaries_put_predictions_next_to_ground_truth():
    batch, predictions = _batch_and_predictions()
    images = visualization.eval_image_summaries(
        batch, predictions, ['circle', 'rectangle'], pixel_mean=MEAN, pixel_std=STD,
        max_images=4, min_display_size=128)
    assert list(images) == ['valid/predictions_vs_gt/17']  # padding is not drawn
    picture = images['valid/predictions_vs_gt/17']
    factor = 128 // 48 + 1  # 48 wide -> enlarged 3x to reach 128
    h, w = 64 * factor, 48 * factor
    assert picture.shape == (h, 2 * w + visualization.SEPARATOR_PIXELS, 3)
    assert picture.dtype == np.uint8
    pred, gt = picture[:, :w].astype(int), picture[:, -w:].astype(int)

    def changed(half, box):  # centre region of an xyxy box (resized pixels)
        x0, y0, x1, y1 = (int(v * factor) for v in box)
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        return np.abs(half[cy - 3:cy + 3, cx - 3:cx + 3] - 100).max() > 20

    assert changed(pred, [2, 2, 18, 22]) and not changed(gt, [2, 2, 18, 22])
    assert changed(gt, [30, 40, 46, 62]) and not changed(pred, [30, 40, 46, 62])
    assert not changed(pred, [30, 2, 46, 22])  # below the score threshold
    assert np.all(picture[:, w:w + visualization.SEPARATOR_PIXELS] == 255)


def _tensorboard_tags(workdir):
    """{tag: [(step, value ndarray)]} of every event file under workdir."""
    tags = {}
    for path in glob.glob(os.path.join(workdir, '**', 'events.out.tfevents.*'),
                          recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append((event.step, tf.make_ndarray(v.tensor)))
    return tags


def test_training_writes_image_summaries_and_categories(tmp_path):
    config = tiny_shapes_config.get_config()
    config.dataset_configs.data_dir = str(tmp_path / 'tfds')
    config.num_training_steps = 2
    config.log_eval_steps = 2
    config.eval_max_examples = 4
    workdir = str(tmp_path / 'run')
    writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    data_rng, rng = jax.random.split(jax.random.PRNGKey(config.rng_seed))
    dataset = main_lib.get_dataset(config, data_rng)
    trainer.train_and_evaluate(rng=rng, config=config, model_cls=MaskRCNNModel,
                               dataset=dataset, workdir=workdir, writer=writer)
    writer.close()

    # What predict.py and export.py read to name the classes.
    assert predict.read_categories(os.path.join(workdir, predict.CATEGORIES_FILENAME)) == (
        dataset.meta_data['category_ids'], dataset.meta_data['category_names'])

    tags = _tensorboard_tags(workdir)
    assert 'config' in tags, sorted(tags)
    image_tags = [t for t in tags if t.startswith('valid/predictions_vs_gt/')]
    assert 1 <= len(image_tags) <= 4, sorted(tags)
    for tag in image_tags:
        assert {step for step, _ in tags[tag]} == {2}
        for _, value in tags[tag]:
            # tf.summary.image stores [width, height, encoded PNG].
            width, height = int(value[0]), int(value[1])
            decoded = tf.io.decode_png(value[2]).numpy()
            assert decoded.shape == (height, width, 3)
            assert width > 2 * height > 0  # prediction | ground truth of a square image
