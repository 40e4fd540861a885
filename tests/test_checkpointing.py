"""Damaged checkpoints: one warning naming the step and the file, then the
previous good step, exactly as if the damaged step had never been saved.

One tiny training (checkpoints at steps 2 and 4) is shared: each case copies
it, damages step 4 in one way and reruns the same training.
"""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from projects.maskrcnn import checkpointing
from tests import run_utils, tiny_shapes_config as tiny_shapes

DAMAGE_WARNING = 'Checkpoint step 4 is damaged'


def _config(data_dir, **overrides):
    config = tiny_shapes.get_config()
    config.dataset_configs.data_dir = str(data_dir)
    config.log_eval_steps = 100
    config.eval_max_examples = 2
    config.compute_validation_loss = False
    config.num_eval_images_to_show = 0
    for key, value in overrides.items():
        config[key] = value
    return config


def _run(config, workdir):
    return run_utils.train_in_process(config, workdir)[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(data_dir, workdir): 4 steps, checkpoints at 2 and 4, each with its digest."""
    root = tmp_path_factory.mktemp('ckpt')
    data_dir, workdir = root / 'tfds', str(root / 'trained')
    _run(_config(data_dir), workdir)
    for step in (2, 4):
        assert checkpointing.has_digest(os.path.join(workdir, 'checkpoints', str(step)))
    return data_dir, workdir


def _copy(trained, tmp_path, name):
    workdir = str(tmp_path / name)
    shutil.copytree(trained[1], workdir)
    return workdir


@pytest.fixture(scope='module')
def resumed_from_2(trained, tmp_path_factory):
    """The undamaged reference: step 4 never saved, the run resumed from step 2
    (keeping one checkpoint, so that retention prunes step 2 and its input state)."""
    workdir = _copy(trained, tmp_path_factory.mktemp('ref'), 'reference')
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
    state = _run(_config(trained[0], max_checkpoints_to_keep=1), workdir)
    return workdir, jax.device_get(state.params)


def _largest_data_file(step_dir):
    data = os.path.join(step_dir, 'default', 'ocdbt.process_0', 'd')
    return max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)


def _delete(path):
    os.remove(path)


def _truncate(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(path):
    """A few bytes flipped in the middle: same size, other contents."""
    with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(8)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))


def _empty_step(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)
    return step_dir


DAMAGES = {
    'deleted_data_file': lambda d: (_delete, _largest_data_file(d)),
    'truncated_data_file': lambda d: (_truncate, _largest_data_file(d)),
    'garbled_data_file': lambda d: (_garble, _largest_data_file(d)),
    'garbled_manifest': lambda d: (_garble, os.path.join(d, 'default', 'manifest.ocdbt')),
    'garbled_metadata': lambda d: (_garble, os.path.join(d, 'default', '_METADATA')),
    'empty_step_directory': lambda d: (lambda p: _empty_step(p), d),
    'garbled_data_state': lambda d: (_garble, os.path.join(
        os.path.dirname(os.path.dirname(d)), 'data_state', 'step_4.data-00000-of-00001')),
}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_damaged_latest_step_falls_back_to_the_previous_one(trained, resumed_from_2, tmp_path,
                                                             caplog, damage):
    workdir = _copy(trained, tmp_path, damage)
    step4 = os.path.join(workdir, 'checkpoints', '4')
    how, path = DAMAGES[damage](step4)
    how(path)
    caplog.set_level(logging.INFO, logger='absl')

    state = _run(_config(trained[0]), workdir)

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and 'damaged' in r.getMessage()]
    assert len(warnings) == 1, warnings
    named = path.split('.data-')[0]  # the input state is named by its prefix
    assert warnings[0].startswith(DAMAGE_WARNING) and named in warnings[0], warnings[0]
    assert any('Resumed from checkpoint at step 2' in r.getMessage() for r in caplog.records)
    # The damaged step is kept aside, and step 4 is saved anew.
    assert os.path.isdir(os.path.join(workdir, checkpointing.DAMAGED_DIR, '4'))
    assert checkpointing.verify_step(step4) is None and checkpointing.has_digest(step4)
    for got, want in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                         jax.tree_util.tree_leaves(resumed_from_2[1])):
        np.testing.assert_array_equal(got, want)


def test_retention_prunes_input_state_with_the_checkpoints(resumed_from_2):
    workdir = resumed_from_2[0]
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4']
    assert sorted(os.listdir(os.path.join(workdir, 'data_state'))) == [
        'step_4.data-00000-of-00001', 'step_4.index']


def test_no_good_step_stops_naming_each_and_moves_nothing(trained, tmp_path):
    workdir = _copy(trained, tmp_path, 'all_damaged')
    for step in (2, 4):
        _truncate(_largest_data_file(os.path.join(workdir, 'checkpoints', str(step))))
    with pytest.raises(checkpointing.NoGoodCheckpointError,
                       match=r'step 4: .*truncated.*step 2: .*truncated'):
        _run(_config(trained[0]), workdir)
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_changed_model_names_the_parameter_and_the_config(trained, tmp_path):
    workdir = _copy(trained, tmp_path, 'other_model')
    config = _config(trained[0])
    config.model.box_head.fc_dim = 24
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r'step 4 .*params/box_predictor/fc1/bias is \(32,\) in the '
                             r'checkpoint and \(24,\) in this model.*another config'):
        _run(config, workdir)
    assert not os.path.exists(os.path.join(workdir, checkpointing.DAMAGED_DIR))


def test_digest_names_the_first_changed_file(tmp_path):
    step = tmp_path / '7'
    (step / 'default').mkdir(parents=True)
    (step / 'default' / 'a').write_bytes(b'abc')
    (step / 'b').write_bytes(b'xyz')
    checkpointing.write_digest(str(step))
    assert checkpointing.verify_step(str(step)) is None
    (step / 'b').write_bytes(b'xyZ')
    assert checkpointing.verify_step(str(step)) == f'{step}/b: contents differ from those ' \
                                                   f'saved (sha256 mismatch)'
    (step / 'b').write_bytes(b'xyz')
    (step / 'default' / 'a').unlink()
    assert checkpointing.verify_step(str(step)) == f'{step}/default/a: file missing'


def test_predict_refuses_a_damaged_checkpoint(trained, tmp_path):
    from projects.maskrcnn import predict  # pylint: disable=g-import-not-at-top
    workdir = _copy(trained, tmp_path, 'predict')
    data_file = _largest_data_file(os.path.join(workdir, 'checkpoints', '4'))
    _garble(data_file)
    model = predict.build_model(_config(trained[0]), 3)
    with pytest.raises(ValueError, match=f'{data_file}: contents differ'):
        predict.restore_variables(workdir, model, (64, 64))
    variables = predict.restore_variables(os.path.join(workdir, 'checkpoints', '2'), model,
                                          (64, 64))
    assert 'params' in variables
