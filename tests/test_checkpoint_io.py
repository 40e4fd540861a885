"""checkpoint_io.locate: the four kinds of checkpoint and the error for anything else."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from projects.maskrcnn import checkpoint_io, trainer
from projects.maskrcnn.tools import convert_checkpoint
from tests import tiny_shapes_config
from tests.test_predict import save_random_checkpoint

TINY_PTH = pathlib.Path(__file__).parent / 'tools' / 'golden' / 'torchvision_tiny_maskrcnn.pth'


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('run'))
    save_random_checkpoint(path, tiny_shapes_config.get_config())
    return path


def test_the_three_training_kinds_find_the_same_step(workdir):
    checkpoints = os.path.join(workdir, 'checkpoints')
    steps = sorted(d for d in os.listdir(checkpoints) if d.isdigit())
    step_dir = os.path.join(checkpoints, steps[-1])
    found = {p: checkpoint_io.locate(p) for p in (workdir, checkpoints, step_dir)}
    assert [c.kind for c in found.values()] == ['workdir', 'checkpoints', 'step']
    assert {c.item_dir for c in found.values()} == {os.path.join(step_dir, 'default')}
    assert {c.categories_file for c in found.values()} == {
        os.path.join(workdir, 'categories.json')}
    restored = checkpoint_io.restore(found[workdir])
    assert set(restored) == {'params', 'model_state'}
    assert checkpoint_io.num_classes(found[workdir]) == 3


def test_a_converted_checkpoint_is_the_fourth_kind(tmp_path):
    out = str(tmp_path / 'converted')
    assert convert_checkpoint.main(['--source=torchvision', str(TINY_PTH), out]) == 0
    found = checkpoint_io.locate(out)
    assert (found.kind, found.item_dir, found.categories_file) == ('converted', out, '')
    assert checkpoint_io.num_classes(found) == 2  # the tiny file's 2-class heads
    params = checkpoint_io.restore(found)['params']
    assert np.shape(params['box_predictor']['cls_score']['kernel']) == (8, 3)
    report = json.loads((tmp_path / 'converted' / 'conversion.json').read_text())
    assert 'not a COCO head' in report['categories']


@pytest.mark.parametrize('make', ['empty', 'missing', 'unfinished_step', 'file'])
def test_anything_else_is_an_error_naming_the_path_and_the_four_kinds(tmp_path, make):
    path = tmp_path / 'x'
    if make == 'empty':
        path.mkdir()
    elif make == 'unfinished_step':  # orbax's temporary name, and a step without its item
        (path / 'checkpoints' / '3.orbax-checkpoint-tmp-1' / 'default').mkdir(parents=True)
        (path / 'checkpoints' / '5').mkdir()
    elif make == 'file':
        path.write_text('x')
    with pytest.raises(FileNotFoundError) as error:
        checkpoint_io.locate(str(path))
    message = str(error.value)
    assert message.startswith(f'{path} is not a checkpoint')
    for kind in checkpoint_io.KINDS:
        assert kind in message
    expected = {'empty': 'an empty directory', 'missing': 'does not exist',
                'unfinished_step': 'holding checkpoints', 'file': 'a file'}[make]
    assert expected in message


def test_init_from_takes_a_training_workdir_and_names_the_kinds_otherwise(workdir, tmp_path):
    restored = checkpoint_io.restore(checkpoint_io.locate(workdir))
    params = jax.tree_util.tree_map(np.zeros_like, restored['params'])
    state = jax.tree_util.tree_map(np.zeros_like, restored['model_state'])
    params, state = trainer.load_init_checkpoint(workdir, params, state)
    for got, want in zip(jax.tree_util.tree_leaves((params, state)),
                         jax.tree_util.tree_leaves((restored['params'],
                                                    restored['model_state']))):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(FileNotFoundError, match='init_from.checkpoint_path: .* is not a '
                                                'checkpoint.*a converted checkpoint directory'):
        trainer.load_init_checkpoint(str(tmp_path), params, state)
