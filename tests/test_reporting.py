"""Comparing runs: HParams, per-category AP and results.json (reporting.py), and
the compare command on two real runs of main.py."""

import glob
import json
import math
import os
import subprocess
import sys

from clu import metric_writers
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import metadata as hparams_metadata

from projects.maskrcnn import reporting
from projects.maskrcnn.tools import compare
from tests import run_utils, tiny_shapes_config

NAMES = ('circle', 'rectangle', 'triangle')
META = {'category_ids': (1, 2, 3), 'category_names': NAMES}


def _read_json(*path: str):
    with open(os.path.join(*path), encoding='utf-8') as f:
        return json.load(f)


def _events(workdir: str):
    """Every summary value of the event files under `workdir`, with its step."""
    for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                yield event.step, value


def _hparams_records(workdir: str) -> tuple[dict, list]:
    """(the session-start hparams as python values, the experiment record)."""
    hparams, experiments = {}, []
    for _, value in _events(workdir):
        if value.metadata.plugin_data.plugin_name != hparams_metadata.PLUGIN_NAME:
            continue
        content = value.metadata.plugin_data.content
        if value.tag == hparams_metadata.SESSION_START_INFO_TAG:
            info = hparams_metadata.parse_session_start_info_plugin_data(content)
            for key, v in info.hparams.items():
                hparams[key] = getattr(v, v.WhichOneof('kind'))
        elif value.tag == hparams_metadata.EXPERIMENT_TAG:
            experiments.append(hparams_metadata.parse_experiment_plugin_data(content))
    return hparams, experiments


def test_flatten_config_gives_every_leaf_as_an_hparam_value():
    flat = reporting.flatten_config(tiny_shapes_config.get_config())
    assert flat['model.backbone.width'] == 8
    assert flat['dataset_configs.image_size'] == '(64, 64)'
    assert flat['init_from.checkpoint_path'] == 'None'
    assert flat['lr_configs.base_learning_rate'] == pytest.approx(0.04)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert list(flat) == sorted(flat)


def test_category_table_mean_and_missing_categories():
    metrics = {'box_AP': 30.0, 'mask_AP': 20.0, 'box_AP/circle': 50.0,
               'box_AP/rectangle': 10.0, 'mask_AP/circle': 30.0, 'mask_AP/rectangle': 10.0}
    table = reporting.category_table(metrics, NAMES)
    lines = table.splitlines()
    assert lines[0] == '| category | box AP | mask AP |'
    assert '| triangle | - | - |' in lines
    assert lines[-1] == '| mean | 30.0 | 20.0 |'


def test_per_category_metrics_skip_categories_without_ground_truth():
    per_category = {'box': {1: 40.0, 2: math.nan, 3: 0.0, 9: 5.0}, 'mask': {1: 35.0}}
    metrics = reporting.per_category_metrics(per_category, META)
    assert metrics == {'box_AP/circle': 40.0, 'box_AP/triangle': 0.0, 'mask_AP/circle': 35.0}


def test_write_hparams_writes_session_start_and_experiment(tmp_path):
    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    reporting.write_hparams(writer, {'lr': 0.02, 'name': 'a', 'flip': True},
                            ['valid/box_AP', 'valid/mask_AP'])
    writer.close()
    hparams, (experiment,) = _hparams_records(str(tmp_path))
    assert hparams == {'lr': 0.02, 'name': 'a', 'flip': True}
    assert [h.name for h in experiment.hparam_infos] == ['lr', 'name', 'flip']
    assert [m.name.tag for m in experiment.metric_infos] == ['valid/box_AP', 'valid/mask_AP']


def test_results_json_is_replaced_whole(tmp_path):
    path = str(tmp_path / 'results.json')
    reporting.write_json_atomically(path, {'step': 1})
    reporting.write_json_atomically(path, {'step': 2})
    assert _read_json(path) == {'step': 2}
    assert os.listdir(tmp_path) == ['results.json']  # no temporary file left
    with pytest.raises(ValueError):
        reporting.write_json_atomically(path, {'step': math.nan})
    assert _read_json(path) == {'step': 2}
    assert os.listdir(tmp_path) == ['results.json']


def test_compare_names_the_workdir_without_results(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    assert compare.main([str(tmp_path / 'empty')]) == 1
    assert f'{tmp_path / "empty"} has no results.json' in capsys.readouterr().err
    assert compare.main([str(tmp_path / 'missing')]) == 1
    assert 'missing: no such directory' in capsys.readouterr().err
    assert compare.RESULTS_FILENAME == reporting.RESULTS_FILENAME


def test_compare_lists_only_the_differing_values():
    base = {'step': 10, 'metrics': {'box_AP': 1.0}, 'config_name': 'demo',
            'config': {'a': 1, 'b': 'x', 'c': 0.5}}
    other = {**base, 'config': {'a': 2, 'b': 'x'}}
    table = compare.markdown_table(['r1', 'r2'], [base, other])
    rows = table.splitlines()[2:]
    assert rows[0] == '| r1 | a=1, c=0.5 | 1.0 | - | 10 | - |'
    assert rows[1] == '| r2 | a=2, c=(unset) | 1.0 | - | 10 | - |'


def test_two_runs_compared_in_tensorboard_and_by_the_compare_command(tmp_path):
    """Two trainings of main.py with different overrides under one folder."""
    runs = {'seed1': ['--config.rng_seed=1'],
            'seed2': ['--config.rng_seed=2', '--config.log_summary_steps=1']}
    env = run_utils.subprocess_env()
    for name, overrides in runs.items():  # one after the other: they share the dataset
        command = run_utils.main_command(str(tmp_path / 'runs' / name), str(tmp_path / 'tfds'),
                                         '--config.num_training_steps=2', *overrides)
        code, output = run_utils.run(command, env)
        assert code == 0, output[-3000:]
    for name, seed in (('seed1', 1), ('seed2', 2)):
        workdir = str(tmp_path / 'runs' / name)
        names = [c['name'] for c in _read_json(workdir, 'categories.json')['categories']]
        hparams, experiments = _hparams_records(workdir)
        assert hparams['rng_seed'] == seed
        assert hparams['log_summary_steps'] == (1 if seed == 2 else 2)
        assert hparams['config'] == 'tiny_shapes_config'
        assert hparams['workdir'] == os.path.abspath(workdir)
        metric_tags = {m.name.tag for e in experiments for m in e.metric_infos}
        assert {'valid/box_AP', 'valid/mask_AP', 'valid/total_loss'} <= metric_tags
        scalars = run_utils.scalars(workdir)
        for tag in ['valid/box_AP', 'valid/mask_AP'] + [
                f'valid/{kind}_AP/{n}' for kind in ('box', 'mask') for n in names]:
            assert 2 in scalars.get(tag, {}), f'{tag} missing; have {sorted(scalars)}'
        texts = [tf.make_ndarray(v.tensor).item().decode() for _, v in _events(workdir)
                 if v.tag == 'valid/per_category_AP']
        assert texts and all(f'| {n} |' in texts[-1] for n in names), texts

        results = _read_json(workdir, 'results.json')
        assert results['step'] == 2
        assert results['config_name'] == 'tiny_shapes_config'
        assert results['overrides']['rng_seed'] == seed
        assert results['metrics']['mask_AP'] == pytest.approx(scalars['valid/mask_AP'][2])
        assert sorted(results['per_category_AP']) == sorted(names)
        assert results['per_category_AP'][names[0]]['box'] == pytest.approx(
            scalars[f'valid/box_AP/{names[0]}'][2])
        assert results['validation_loss']['total_loss'] == pytest.approx(
            scalars['valid/total_loss'][2], rel=1e-5)
        assert results['train_images_per_sec'] > 0
        assert np.isfinite(results['train_images_per_sec'])

    result = subprocess.run(
        [sys.executable, '-m', 'projects.maskrcnn.tools.compare',
         str(tmp_path / 'runs' / 'seed1'), str(tmp_path / 'runs' / 'seed2')],
        check=False, capture_output=True, text=True, cwd=run_utils.REPO, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert rows[0].startswith('| run | differing config values | box AP | mask AP | step')
    assert len(rows) == 4, result.stdout
    assert 'seed1 | log_summary_steps=2, rng_seed=1 |' in rows[2]
    assert 'seed2 | log_summary_steps=1, rng_seed=2 |' in rows[3]
    assert rows[2].split('|')[5].strip() == '2'  # the step
