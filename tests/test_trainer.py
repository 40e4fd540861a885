"""Training-level tests: a few steps end to end, resume, retracing, config errors."""

import os

import jax
import numpy as np
import pytest

from configs import base, demo_shapes
from projects.maskrcnn import config_check, main as main_lib, optim, trainer
from projects.maskrcnn.model import MaskRCNNModel
from tests import run_utils, tiny_shapes_config as tiny_shapes

AP_TAGS = [f'valid/{kind}_{stat}' for kind in ('box', 'mask')
           for stat in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')]


def _tiny_config(data_dir, **overrides):
    config = tiny_shapes.get_config()
    config.dataset_configs.data_dir = str(data_dir)
    for key, value in overrides.items():
        config[key] = value
    return config


def _run(config, workdir):
    return run_utils.train_in_process(config, workdir)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('tfds')


def test_trains_evaluates_and_resumes(data_dir, tmp_path):
    workdir = str(tmp_path / 'run')
    state, metrics = _run(_tiny_config(data_dir), workdir)
    assert int(state.step) == 4
    assert set(metrics) >= {t.split('/')[1] for t in AP_TAGS}
    scalars = run_utils.scalars(workdir)
    for tag in AP_TAGS + ['train/total_loss', 'train/loss_mask', 'train/learning_rate',
                          'train/images_per_sec', 'valid/total_loss', 'valid/loss_mask',
                          'valid/loss_rpn_cls']:
        assert tag in scalars, f'{tag} missing from TensorBoard; have {sorted(scalars)}'
    assert all(np.isfinite(v) for v in scalars['train/total_loss'].values())
    assert os.path.exists(os.path.join(workdir, 'coco_results.json'))
    assert 0 <= scalars['valid/mask_AP'][4] <= 100

    # The same command with more steps continues from step 4, not from 0.
    resumed, _ = _run(_tiny_config(data_dir, num_training_steps=6), workdir)
    assert int(resumed.step) == 6
    steps = sorted(run_utils.scalars(workdir)['train/total_loss'])
    assert steps == [2, 4, 6], steps


def test_resume_continues_data_and_parameters_exactly(data_dir, tmp_path):
    """Stopping after a checkpoint and restarting gives the uninterrupted run."""
    straight, _ = _run(_tiny_config(data_dir, num_training_steps=4, log_eval_steps=100),
                       str(tmp_path / 'straight'))
    split = str(tmp_path / 'split')
    _run(_tiny_config(data_dir, num_training_steps=2, log_eval_steps=100), split)
    resumed, _ = _run(_tiny_config(data_dir, num_training_steps=4, log_eval_steps=100), split)
    for a, b in zip(jax.tree_util.tree_leaves(straight.params),
                    jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_train_step_compiles_once(data_dir):
    config = _tiny_config(data_dir)
    dataset = main_lib.get_dataset(config, jax.random.PRNGKey(0))
    model = MaskRCNNModel(config, dataset.meta_data)
    variables = trainer.init_variables(model, jax.random.PRNGKey(0), dataset.meta_data)
    params = variables.pop('params')
    tx, _ = optim.build_optimizer(config, params)
    state = trainer.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                               model_state=dict(variables), rng=jax.random.PRNGKey(1))
    traces = []

    def counted(state, batch):
        traces.append(1)
        return trainer.train_step(state, batch, model=model, tx=tx)

    step = jax.jit(counted)
    for _ in range(3):
        state, metrics = step(state, next(dataset.train_iter))
    assert np.isfinite(float(metrics['total_loss']))
    assert len(traces) == 1


def test_learning_rate_schedule():
    config = base.get_config()
    schedule = optim.learning_rate_schedule(config.lr_configs)
    np.testing.assert_allclose(schedule(0), 0.02 * 0.001, rtol=1e-4)
    np.testing.assert_allclose(schedule(500), 0.02 * (0.001 + 0.999 * 0.5), rtol=1e-4)
    np.testing.assert_allclose(schedule(1000), 0.02, rtol=1e-4)
    np.testing.assert_allclose(schedule(60_000), 0.002, rtol=1e-4)
    np.testing.assert_allclose(schedule(85_000), 0.0002, rtol=1e-4)


def test_norm_parameters_skip_decay_and_frozen_stages_do_not_move():
    params = {'body': {'stem_conv': {'kernel': np.ones(3)},
                       'res2_block0': {'norm1': {'scale': np.ones(3)}},
                       'res3_block0': {'conv1': {'kernel': np.ones(3)},
                                       'norm1': {'scale': np.ones(3)}}},
              'neck': {'output_c2': {'kernel': np.ones(3)}}}
    labels = optim.parameter_labels(params, ('stem_', 'res2_'))  # freeze_at=2
    assert labels['body']['stem_conv']['kernel'] == 'frozen'
    assert labels['body']['res2_block0']['norm1']['scale'] == 'frozen'
    assert labels['body']['res3_block0']['conv1']['kernel'] == 'decay'
    assert labels['body']['res3_block0']['norm1']['scale'] == 'no_decay'
    assert labels['neck']['output_c2']['kernel'] == 'decay'

    config = base.get_config()
    tx, _ = optim.build_optimizer(config, params)
    grads = jax.tree_util.tree_map(np.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.asarray(updates['body']['stem_conv']['kernel']) == 0)
    assert np.all(np.asarray(updates['body']['res3_block0']['conv1']['kernel']) != 0)


@pytest.mark.parametrize('mutate, message', [
    (lambda c: c.__setitem__('num_trainig_steps', 5), 'num_trainig_steps'),
    (lambda c: c.lr_configs.__setitem__('base_lr', 0.1), 'lr_configs.base_lr'),
    (lambda c: c.__setitem__('batch_size', 0), 'batch_size'),
    (lambda c: c.dataset_configs.__setitem__('image_size', (100, 128)), 'image_size'),
    (lambda c: c.__setitem__('batch_size', 6), r'batch_size=6 must be a positive multiple of the 4'),
    (lambda c: c.optimizer_configs.__setitem__('optimizer', 'adam'), "optimizer='adam'"),
    (lambda c: c.__setitem__('dtype', 'fp16'), "dtype='fp16'"),
    (lambda c: c.model.roi_heads.__setitem__('roi_align_impl', 'dense'),
     "model.roi_heads.roi_align_impl='dense'"),
    (lambda c: c.init_from.__setitem__('checkpoint_path', '/no/such/ckpt'),
     'init_from.checkpoint_path=/no/such/ckpt'),
])
def test_config_errors_name_the_key(mutate, message):
    config = demo_shapes.get_config()
    mutate(config)
    with pytest.raises((KeyError, ValueError, FileNotFoundError), match=message):
        config_check.check_config(config, num_devices=4)


def test_unknown_model_key_is_named():
    config = demo_shapes.get_config()
    config.model.backbone.detph = 18
    with pytest.raises(KeyError, match='model.backbone.detph'):
        MaskRCNNModel(config, {'num_classes': 3})


def test_init_from_missing_path_is_named(tmp_path):
    missing = str(tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='nope'):
        trainer.load_init_checkpoint(missing, {}, {})
