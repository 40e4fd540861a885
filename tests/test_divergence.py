"""A non-finite loss stops training with an error naming the step, the loss terms
and the last good checkpoint, or, with skip_nonfinite_steps, is skipped and counted."""

import types

import jax
import numpy as np
import pytest
from clu import metric_writers

from projects.maskrcnn import main as main_lib, trainer
from projects.maskrcnn.model import MaskRCNNModel
from tests import run_utils
from tests import tiny_shapes_config as tiny_shapes


class _PoisonedIterator:
    """Passes batches through, with NaN images in the batch of step `bad_step`."""

    def __init__(self, inner, bad_step):
        self._inner, self._bad_step, self._step = inner, bad_step, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self._inner))
        self._step += 1
        if self._step == self._bad_step:
            batch['image'] = np.full_like(batch['image'], np.nan)
        return batch


def _run(tmp_path, data_dir, **overrides):
    config = tiny_shapes.get_config()
    config.dataset_configs.data_dir = str(data_dir)
    config.num_training_steps = 4
    config.checkpoint_steps = 2
    config.log_summary_steps = 4
    config.eval_max_examples = 2
    config.compute_validation_loss = False
    config.update(overrides)
    data_rng, rng = jax.random.split(jax.random.PRNGKey(config.rng_seed))
    dataset = main_lib.get_dataset(config, data_rng)
    dataset = types.SimpleNamespace(
        train_iter=_PoisonedIterator(dataset.train_iter, bad_step=3),
        valid_iter=dataset.valid_iter, test_iter=None, meta_data=dataset.meta_data)
    workdir = str(tmp_path / 'run')
    writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    try:
        return trainer.train_and_evaluate(rng=rng, config=config, model_cls=MaskRCNNModel,
                                          dataset=dataset, workdir=workdir, writer=writer)
    finally:
        writer.close()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('tfds')


def test_nan_names_step_terms_and_last_checkpoint(tmp_path, data_dir):
    with pytest.raises(FloatingPointError) as error:
        _run(tmp_path, data_dir)
    message = str(error.value)
    assert 'at step 3' in message
    assert 'total_loss' in message and 'loss_rpn_cls' in message
    assert 'last good checkpoint is step 2' in message
    assert 'skip_nonfinite_steps' in message


def test_skip_nonfinite_steps_skips_and_counts(tmp_path, data_dir):
    state, _ = _run(tmp_path, data_dir, skip_nonfinite_steps=True)
    assert int(state.step) == 4
    assert int(state.num_skipped) == 1
    for leaf in jax.tree_util.tree_leaves(state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))
    scalars = run_utils.scalars(str(tmp_path / 'run'))
    assert scalars['train/skipped_steps'][4] == 1
    assert np.isfinite(scalars['train/total_loss'][4])
