"""A run killed at any moment, or stopped by SIGTERM, continues as if never stopped."""

import os
import signal

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import run_utils

# 10 steps, a checkpoint every 4, a loss scalar at every step, one evaluation at the end.
OVERRIDES = ('--config.num_training_steps=10', '--config.checkpoint_steps=4',
             '--config.log_summary_steps=1', '--config.log_eval_steps=10',
             '--config.eval_max_examples=2', '--config.compute_validation_loss=False')
LOSS_TAGS = ('train/total_loss', 'train/loss_rpn_cls', 'train/loss_roi_cls', 'train/loss_mask')


def _final_params(workdir):
    restored = ocp.StandardCheckpointer().restore(
        os.path.join(os.path.abspath(workdir), 'checkpoints', '10', 'default'))
    return restored['params']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp('preempt')
    data_dir, workdir = str(root / 'tfds'), str(root / 'straight')
    code, output = run_utils.run(run_utils.main_command(workdir, data_dir, *OVERRIDES),
                                 run_utils.subprocess_env())
    assert code == 0, output[-3000:]
    return data_dir, workdir


def _assert_same_run(workdir, reference, from_step):
    got, want = run_utils.scalars(workdir), run_utils.scalars(reference)
    for tag in LOSS_TAGS:
        for step in range(from_step, 11):
            assert got[tag][step] == want[tag][step], (tag, step, got[tag], want[tag])
    for a, b in zip(ocp.tree.to_flat_dict(_final_params(workdir)).values(),
                    ocp.tree.to_flat_dict(_final_params(reference)).values()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigkill_between_checkpoints_resumes_exactly(uninterrupted, tmp_path):
    data_dir, reference = uninterrupted
    workdir = str(tmp_path / 'killed')
    command = run_utils.main_command(workdir, data_dir, *OVERRIDES)
    env = run_utils.subprocess_env()
    # Killed once step 6 is logged: the last checkpoint is step 4.
    code, _ = run_utils.run(command, env, signal_on='] step 6:', sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, 'checkpoints', '10'))
    code, output = run_utils.run(command, env)
    assert code == 0, output[-3000:]
    assert 'Resumed from checkpoint at step 4' in output, output[-3000:]
    _assert_same_run(workdir, reference, from_step=5)


def test_sigterm_saves_and_resumes_exactly(uninterrupted, tmp_path):
    data_dir, reference = uninterrupted
    workdir = str(tmp_path / 'terminated')
    command = run_utils.main_command(workdir, data_dir, *OVERRIDES)
    env = run_utils.subprocess_env()
    code, output = run_utils.run(command, env, signal_on='] step 2:', sig=signal.SIGTERM)
    assert code == 0, output[-3000:]   # a clean exit, not a crash
    assert 'Stopped by signal at step' in output, output[-3000:]
    stopped = int(output.split('Stopped by signal at step ')[1].split(';')[0])
    assert stopped < 10
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(stopped)))
    code, output = run_utils.run(command, env)
    assert code == 0, output[-3000:]
    assert f'Resumed from checkpoint at step {stopped}' in output
    _assert_same_run(workdir, reference, from_step=stopped + 1)
