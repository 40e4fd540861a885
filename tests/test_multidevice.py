"""Data parallel over a device mesh: 4 devices give the losses of 1 device with the
same global batch, and two processes joined by jax.distributed train together."""

import os
import socket
import subprocess

import numpy as np

from projects.maskrcnn.data import dataset as dataset_lib
from tests import run_utils
from tests import tiny_shapes_config as tiny_shapes

LOSS_TAGS = ('train/total_loss', 'train/loss_rpn_cls', 'train/loss_rpn_box',
             'train/loss_roi_cls', 'train/loss_roi_box', 'train/loss_mask')
STEPS = 5
OVERRIDES = ('--config.batch_size=4', f'--config.num_training_steps={STEPS}',
             '--config.log_summary_steps=1', f'--config.checkpoint_steps={STEPS}',
             '--config.eval_batch_size=4', '--config.eval_max_examples=4',
             '--config.compute_validation_loss=False')


def _devices_env(count):
    return run_utils.subprocess_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={count}')


def test_four_devices_give_the_losses_of_one(tmp_path):
    data_dir = str(tmp_path / 'tfds')
    losses = {}
    for count in (1, 4):
        workdir = str(tmp_path / f'devices_{count}')
        code, output = run_utils.run(run_utils.main_command(workdir, data_dir, *OVERRIDES),
                                     _devices_env(count))
        assert code == 0, output[-3000:]
        assert f'CpuDevice(id={count - 1})' in output and f'CpuDevice(id={count})' not in output
        losses[count] = run_utils.scalars(workdir)
    for tag in LOSS_TAGS:
        one = np.array([losses[1][tag][s] for s in range(1, STEPS + 1)])
        four = np.array([losses[4][tag][s] for s in range(1, STEPS + 1)])
        np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-7, err_msg=tag)


def _free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def test_two_processes_train_with_jax_distributed(tmp_path):
    data_dir = str(tmp_path / 'tfds')
    # Prepare the data once, before two processes would both try to.
    config = tiny_shapes.get_config()
    config.dataset_configs.data_dir = data_dir
    dataset_lib.get_dataset_from_config(config, None)
    workdir = str(tmp_path / 'two_processes')
    address = f'localhost:{_free_port()}'
    procs = []
    for index in range(2):
        # No shared compilation cache: one process reading what the other compiled
        # would run ahead of it.
        env = run_utils.subprocess_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES='2',
                                       JAX_PROCESS_ID=str(index),
                                       JAX_ENABLE_COMPILATION_CACHE='false')
        procs.append(subprocess.Popen(run_utils.main_command(workdir, data_dir, *OVERRIDES),
                                      env=env, cwd=run_utils.REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    assert 'JAX process 0 / 2' in outputs[0] and 'JAX process 1 / 2' in outputs[1]
    scalars = run_utils.scalars(workdir)
    assert sorted(scalars['train/total_loss']) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in scalars['train/total_loss'].values())
    assert 'valid/mask_AP' in scalars
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(STEPS)))
    for index in range(2):  # each process keeps its own input position
        assert os.path.exists(os.path.join(workdir, 'data_state',
                                           f'step_{STEPS}_process_{index}.index'))
