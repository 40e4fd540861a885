"""Data that would be lost or misread is counted or refused; data errors name their source."""

import io
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from clu import metric_writers
from PIL import Image

from configs import demo_shapes
from projects.maskrcnn import main as main_lib, trainer
from projects.maskrcnn.data import coco_builder
from projects.maskrcnn.data import dataset
from projects.maskrcnn.data import input_pipeline
from projects.maskrcnn.model import MaskRCNNModel
from tests import run_utils, tiny_shapes_config

H, W = 40, 60
MANY = 20  # instances on image 1, above MAX_INSTANCES
MAX_INSTANCES = 8


def _png(seed):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (H, W, 3), np.uint8)).save(buffer, format='png')
    return buffer.getvalue()


def _ann(ann_id, image_id, x, y, **extra):
    return {'id': ann_id, 'image_id': image_id, 'category_id': 1, 'bbox': [x, y, 4, 4],
            'segmentation': [[x, y, x + 4, y, x + 4, y + 4, x, y + 4]], 'area': 16.0,
            'iscrowd': 0, **extra}


def _problem_dataset(root):
    """Image 1: 20 instances; 2 and 3: one file; an exact copy of annotation 101 and a
    string iscrowd on image 2; a box far from its mask on image 4."""
    (root / 'images').mkdir()
    for name, seed in (('many.png', 0), ('same.png', 1), ('other.png', 2)):
        (root / 'images' / name).write_bytes(_png(seed))
    images = [{'id': 1, 'file_name': 'many.png', 'height': H, 'width': W},
              {'id': 2, 'file_name': 'same.png', 'height': H, 'width': W},
              {'id': 3, 'file_name': './same.png', 'height': H, 'width': W},
              {'id': 4, 'file_name': 'other.png', 'height': H, 'width': W}]
    anns = [_ann(i, 1, 2 * i % 50, 2 * (i // 25)) for i in range(MANY)]
    anns += [_ann(103, 3, 30, 20), _ann(104, 3, 5, 5),            # 104 copies 101's object
             _ann(101, 2, 5, 5), _ann(101, 2, 5, 5),             # listed twice
             _ann(102, 2, 20, 5, iscrowd='false'),                # would read as a crowd
             {**_ann(105, 4, 2, 2), 'bbox': [40, 30, 10, 8]}]     # box far from its mask
    coco = {'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'x'}]}
    (root / 'ann.json').write_text(json.dumps(coco))
    return str(root / 'ann.json'), str(root / 'images')


@pytest.fixture(scope='module')
def problems(tmp_path_factory):
    root = tmp_path_factory.mktemp('problems')
    split = _problem_dataset(root)
    builder = coco_builder.build_coco_format_dataset(
        'problems', {'train': split, 'val': split}, str(root / 'tfds'))
    return root, builder


def test_each_problem_is_counted_in_the_report(problems):
    _, builder = problems
    report = coco_builder.build_report(builder)['train']
    assert report.counts == {'duplicate_annotation': 2, 'bad_iscrowd': 1, 'duplicate_file': 1,
                             'annotation_moved': 1, 'box_mask_mismatch': 1}
    assert report.examples['duplicate_annotation'] == [101, 104]
    assert report.examples['duplicate_file'] == [3]
    assert report.examples['annotation_moved'] == [103]
    assert report.examples['bad_iscrowd'] == [102]
    assert report.examples['box_mask_mismatch'] == [105]
    assert (report.images_in, report.images_kept) == (4, 3)
    assert (report.annotations_in, report.annotations_kept) == (MANY + 6, MANY + 3)
    assert max(report.instances_per_image) == MANY
    assert report.beyond(MAX_INSTANCES) == (1, MANY - MAX_INSTANCES)
    assert f'at most {MANY} non-crowd instances' in report.format()

    examples = {int(e['image/id']): e['objects'] for e in tfds.as_numpy(
        builder.as_dataset(split='train', decoders=input_pipeline.SKIP_DECODING))}
    assert sorted(examples) == [1, 2, 4]  # the file is stored once
    assert examples[2]['id'].tolist() == [101, 103]
    with open(coco_builder.eval_annotations_file(builder, 'val')) as f:
        coco = json.load(f)
    ids = [a['id'] for a in coco['annotations']]
    assert len(ids) == len(set(ids)) == MANY + 3
    assert {a['image_id'] for a in coco['annotations'] if a['id'] == 103} == {2}
    assert [im['id'] for im in coco['images']] == [1, 2, 4]


def test_truncation_is_counted_in_the_batch_and_warned_once(problems, caplog):
    root, _ = problems
    configs = dict(name='problems', data_dir=str(root / 'tfds'), image_size=(64, 64),
                   train_min_sizes=(40,), max_size=64, eval_min_size=40,
                   max_instances=MAX_INSTANCES, gt_mask_size=8, horizontal_flip=False)
    with caplog.at_level(logging.WARNING):
        ds = dataset.get_dataset('coco_format', batch_size=3, eval_batch_size=3, num_shards=1,
                                 dataset_configs=configs)
    warnings = [r.getMessage() for r in caplog.records
                if 'dataset_configs.max_instances=8' in r.getMessage()]
    assert len(warnings) == 2  # one per split, both built from the same file
    assert 'at most 20 in one image' in warnings[0]
    assert '12 instances are left out of training' in warnings[0]
    batch = next(iter(ds.valid_iter()))
    by_image = dict(zip(batch['image_id'].tolist(), batch['gt_truncated'].tolist()))
    assert by_image == {1: MANY - MAX_INSTANCES, 2: 0, 4: 0}
    train = next(ds.train_iter)
    assert sorted(train['gt_truncated'].tolist()) == [0, 0, MANY - MAX_INSTANCES]
    assert train['gt_valid'].sum() == MAX_INSTANCES + 2 + 1


def test_training_logs_the_truncation_count(tmp_path):
    """The tiny demo with max_instances=1: train/truncated_instances is the pipeline's
    count (the same seed gives the same two batches)."""
    config = tiny_shapes_config.get_config()
    config.dataset_configs.data_dir = str(tmp_path / 'tfds')
    config.dataset_configs.max_instances = 1
    config.num_training_steps = config.log_summary_steps = config.checkpoint_steps = 2
    config.log_eval_steps = 2
    config.compute_validation_loss = False
    data_rng, rng = jax.random.split(jax.random.PRNGKey(config.rng_seed))
    probe = main_lib.get_dataset(config, data_rng).train_iter
    expected = [int(next(probe)['gt_truncated'].sum()) for _ in range(2)]
    assert sum(expected) > 0
    workdir = str(tmp_path / 'run')
    writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    trainer.train_and_evaluate(rng=rng, config=config, model_cls=MaskRCNNModel,
                               dataset=main_lib.get_dataset(config, data_rng),
                               workdir=workdir, writer=writer)
    writer.close()
    logged = run_utils.scalars(workdir)['train/truncated_instances']
    assert logged == {2: pytest.approx(np.mean(expected))}


def test_conflicting_annotation_ids_are_an_error_naming_the_file(tmp_path):
    json_path, image_dir = _problem_dataset(tmp_path)
    coco = json.loads(open(json_path).read())
    coco['annotations'][1]['id'] = 0  # another object under annotation 0's id
    (tmp_path / 'ann.json').write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r'ann\.json: annotation ids \[0\] are each used by '
                                         r'annotations with different contents'):
        coco_builder.build_coco_format_dataset('x', {'train': (json_path, image_dir)},
                                               str(tmp_path / 'tfds'))


def test_truncated_json_and_empty_images_name_the_file(tmp_path):
    json_path, image_dir = _problem_dataset(tmp_path)
    text = open(json_path).read()
    (tmp_path / 'cut.json').write_text(text[:len(text) // 2])
    (tmp_path / 'empty.json').write_text(json.dumps(
        {'images': [], 'annotations': [], 'categories': [{'id': 1, 'name': 'x'}]}))
    for name, message in (('cut.json', 'not readable as JSON'),
                          ('empty.json', '"images" is empty')):
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf'{path}: {message}'):
            coco_builder.build_coco_format_dataset(
                name[:-5], {'train': (path, image_dir)}, str(tmp_path / 'tfds'))


def test_an_images_folder_with_nothing_readable_is_named(tmp_path):
    json_path, _ = _problem_dataset(tmp_path)
    (tmp_path / 'wrong').mkdir()
    with pytest.raises(ValueError, match=r"none of the 4 images .*could be read from "
                                         r".*wrong:\n(.|\n)*dataset_configs.train_images"):
        coco_builder.build_coco_format_dataset(
            'none', {'train': (json_path, str(tmp_path / 'wrong'))}, str(tmp_path / 'tfds'),
            skip_bad_images=True)


@pytest.mark.parametrize('key, value, message', [
    ('image_size', (64,), r'dataset_configs\.image_size=\(64,\) must be \(a, b\)'),
    ('image_size', 64, r'dataset_configs\.image_size=64 must be \(a, b\)'),
    ('train_min_sizes', (), r'dataset_configs\.train_min_sizes=\(\) must be \(a, \.\.\.\)'),
    ('max_instances', 0, r'dataset_configs\.max_instances=0 must be a positive'),
    ('pixel_std', (1.0, 0.0, 1.0), r'dataset_configs\.pixel_std=.* must be positive'),
])
def test_bad_dataset_configs_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        dataset.get_dataset('shapes', batch_size=2, eval_batch_size=2, num_shards=1,
                            dataset_configs={key: value, 'data_dir': '/nonexistent'})


@pytest.mark.parametrize('batch_size', [0, -4])
def test_non_positive_batch_size_is_named(batch_size):
    with pytest.raises(ValueError, match=rf'^batch_size={batch_size} \(per process\) must be'):
        build = dataset._build_dataset  # pylint: disable=protected-access
        build(None, None, {}, batch_size=batch_size, eval_batch_size=2, num_shards=1,
              dtype_str='float32', shuffle_seed=0)


def _main(*args, cwd):
    result = subprocess.run([sys.executable, run_utils.MAIN, *args], capture_output=True,
                            text=True, cwd=cwd, timeout=300,
                            env={**os.environ, 'PYTHONPATH': run_utils.REPO})
    return result.returncode, result.stderr.strip().splitlines()[-1]


def test_command_line_errors_say_what_to_write(tmp_path):
    demo = os.path.join(run_utils.REPO, 'configs', 'demo_shapes.py')
    code, last = _main(f'--config={demo}', f'--workdir={tmp_path / "w"}',
                       '--config.dataset_name=coco_format', '--config.dataset_configs.name=mine',
                       cwd=tmp_path)
    assert code != 0 and '--config.dataset_configs.name' in last
    assert 'configs/demo_shapes.py:NAME' in last
    code, last = _main(f'--config={demo}', f'--workdir={tmp_path / "w"}',
                       '--config.model.fpn.channels=32', cwd=tmp_path)
    assert code != 0 and '--config.model.neck.channels=' in last
    (tmp_path / 'file').write_text('not a folder')
    code, last = _main(f'--config={demo}', f'--workdir={tmp_path / "file"}', cwd=tmp_path)
    assert code != 0 and last.endswith(f'--workdir={tmp_path / "file"} is a file, not a '
                                       'directory: give a new or existing directory.')


def test_demo_config_trains_on_a_prepared_dataset_by_name():
    config = demo_shapes.get_config('mydata')
    assert (config.dataset_name, config.dataset_configs.name) == ('coco_format', 'mydata')
    read_configs = dataset._read_configs  # pylint: disable=protected-access
    cfg = read_configs('coco_format', config.dataset_configs)
    assert cfg['name'] == 'mydata' and cfg['max_instances'] == 8
