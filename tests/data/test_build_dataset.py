"""An annotation tool's COCO export (labelme2coco style) built with the command and trained.

The export has category 0 `_background_`, image and annotation ids from 0, `file_name`
prefixed by a folder, polygons, and the JSON is used as written.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from absl.testing import flagsaver
from clu import metric_writers
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

from projects.maskrcnn import main as main_lib
from projects.maskrcnn import trainer
from projects.maskrcnn.data import build_dataset
from projects.maskrcnn.data import coco_builder
from projects.maskrcnn.data import validation
from projects.maskrcnn.model import MaskRCNNModel
from tests import tiny_shapes_config

SIZE = 64
CLASSES = ('_background_', 'triangle', 'quad', 'hexagon')


def _polygon(rng, sides):
    centre = rng.uniform(16, SIZE - 16, 2)
    radius = rng.uniform(7, 14)
    angles = np.sort(rng.uniform(0, 2 * np.pi, sides)) if sides < 6 else (
        np.arange(6) * np.pi / 3 + rng.uniform(0, 1))
    points = centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    return np.round(np.clip(points, 0, SIZE - 1), 1)


def _write_export(root, num_images=8):
    """labelme2coco-like output: root/annotations.json, root/JPEGImages/*.jpg."""
    rng = np.random.default_rng(0)
    (root / 'JPEGImages').mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(num_images):
        image = Image.fromarray(rng.integers(0, 80, (SIZE, SIZE, 3), np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 4) if image_id != num_images - 1 else 0):
            class_id = int(rng.integers(1, 4))
            points = _polygon(rng, (3, 4, 6)[class_id - 1])
            draw.polygon([tuple(p) for p in points],
                         fill=tuple(int(c) for c in rng.integers(120, 256, 3)))
            x1, y1 = points.min(0)
            x2, y2 = points.max(0)
            annotations.append({
                'id': len(annotations), 'image_id': image_id, 'category_id': class_id,
                'segmentation': [points.flatten().tolist()], 'area': float((x2 - x1) * (y2 - y1)),
                'bbox': [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], 'iscrowd': 0})
        name = f'JPEGImages/img_{image_id:03d}.jpg'
        image.save(root / name, quality=95)
        images.append({'license': 0, 'url': None, 'file_name': name, 'height': SIZE,
                       'width': SIZE, 'date_captured': None, 'id': image_id})
    coco = {'info': {'description': None}, 'licenses': [{'url': None, 'id': 0, 'name': None}],
            'images': images, 'type': 'instances', 'annotations': annotations,
            'categories': [{'supercategory': None, 'id': i, 'name': n}
                           for i, n in enumerate(CLASSES)]}
    (root / 'annotations.json').write_text(json.dumps(coco))
    return str(root / 'annotations.json'), str(root)


@pytest.fixture(scope='module')
def export(tmp_path_factory):
    """(annotations JSON, TFDS data_dir) after running the build command once."""
    root = tmp_path_factory.mktemp('export')
    json_path, image_root = _write_export(root / 'labelme_export')
    data_dir = str(root / 'tfds')
    command = [sys.executable, '-m', 'projects.maskrcnn.data.build_dataset',
               f'--annotations={json_path}', f'--images={image_root}', '--name=tool_export',
               f'--val_annotations={json_path}', f'--val_images={image_root}',
               f'--data_dir={data_dir}']
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(command, capture_output=True, text=True, cwd=repo, check=False,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'Dataset tool_export {coco_builder.VERSION}' in result.stdout
    assert "split 'val': 8 of 8 images" in result.stdout
    assert 'image_without_annotations' in result.stdout  # the report is printed
    return json_path, data_dir


def test_masks_equal_pycocotools_and_labels_skip_background(export):
    json_path, data_dir = export
    builder = coco_builder.load_coco_format_dataset('tool_export', data_dir)
    # `_background_` (id 0) has no annotation: it gets no label.
    assert coco_builder.category_metadata(builder) == ([1, 2, 3], list(CLASSES[1:]))
    coco = COCO(json_path)
    examples = list(tfds.as_numpy(builder.as_dataset(split='train')))
    assert [int(e['image/id']) for e in examples] == list(range(8))
    assert examples[0]['image/filename'].decode() == 'JPEGImages/img_000.jpg'
    num_masks = 0
    for example in examples:
        objects = example['objects']
        anns = coco.loadAnns(coco.getAnnIds(imgIds=int(example['image/id'])))
        assert objects['id'].tolist() == [a['id'] for a in anns]
        np.testing.assert_array_equal(objects['label'], [a['category_id'] - 1 for a in anns])
        for ann, mask in zip(anns, objects['mask'][..., 0]):
            expected = coco.annToMask(ann).astype(bool)
            iou = (expected & (mask > 0)).sum() / (expected | (mask > 0)).sum()
            assert iou >= 0.99, (ann['id'], iou)
            num_masks += 1
    assert num_masks == len(coco.getAnnIds()) > 5


def test_trains_a_few_steps_and_evaluates(export, tmp_path):
    json_path, data_dir = export
    config = tiny_shapes_config.get_config()
    config.dataset_name = 'coco_format'
    for key in ('num_train', 'num_val', 'shapes_image_size', 'shapes_seed', 'max_shapes'):
        del config.dataset_configs[key]
    config.dataset_configs.name = 'tool_export'  # by name: prepared by the command
    config.dataset_configs.data_dir = data_dir
    config.num_training_steps = 2
    config.log_eval_steps = 2
    config.log_summary_steps = 1
    config.checkpoint_steps = 2
    workdir = str(tmp_path / 'run')
    writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    data_rng, rng = jax.random.split(jax.random.PRNGKey(0))
    dataset = main_lib.get_dataset(config, data_rng)
    assert dataset.meta_data['category_ids'] == [1, 2, 3]
    assert dataset.meta_data['val_annotations_file'].startswith(data_dir)
    state, metrics = trainer.train_and_evaluate(
        rng=rng, config=config, model_cls=MaskRCNNModel, dataset=dataset, workdir=workdir,
        writer=writer)
    writer.close()
    assert int(state.step) == 2
    assert 'box_AP' in metrics and 'mask_AP' in metrics
    with open(os.path.join(workdir, 'coco_results.json')) as f:
        results = json.load(f)
    assert {r['category_id'] for r in results} <= {1, 2, 3}
    assert {r['image_id'] for r in results} <= set(range(8))


def test_command_stops_at_a_bad_image_unless_told_to_skip(tmp_path, capsys):
    json_path, root = _write_export(tmp_path / 'export', num_images=3)
    os.remove(os.path.join(root, 'JPEGImages', 'img_001.jpg'))
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    args = dict(annotations=json_path, images=root, name='with_bad',
                data_dir=str(tmp_path / 'tfds'))
    with flagsaver.flagsaver(**args), pytest.raises(validation.BadImageError,
                       match=r'missing_image: .*JPEGImages/img_001\.jpg'):
        build_dataset.main(['build_dataset'])
    with flagsaver.flagsaver(skip_bad_images=True, **args):
        build_dataset.main(['build_dataset'])
    out = capsys.readouterr().out
    assert "split 'train': 2 of 3 images" in out
    assert 'missing_image' in out and 'ids: 1' in out
    assert '3 classes (model label: name (category id)): 1: triangle (1)' in out
