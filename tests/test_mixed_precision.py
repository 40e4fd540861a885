"""config.dtype='bfloat16': bfloat16 convolutions and matmuls, float32 parameters,
box arithmetic and losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn import main as main_lib, optim, trainer
from projects.maskrcnn.model import MaskRCNNModel
from tests import tiny_shapes_config as tiny_shapes


@pytest.fixture(scope='module')
def batch_and_meta(tmp_path_factory):
    config = tiny_shapes.get_config()
    config.dataset_configs.data_dir = str(tmp_path_factory.mktemp('tfds'))
    dataset = main_lib.get_dataset(config, jax.random.PRNGKey(0))
    return next(dataset.train_iter), dataset.meta_data


def _step(dtype, batch, meta):
    config = tiny_shapes.get_config()
    config.dtype = dtype
    model = MaskRCNNModel(config, meta)
    variables = trainer.init_variables(model, jax.random.PRNGKey(0), meta)
    params = variables.pop('params')
    tx, _ = optim.build_optimizer(config, params)
    state = trainer.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                               model_state=dict(variables), rng=jax.random.PRNGKey(1))
    step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx))
    new_state, metrics = step(state, batch)
    eval_out = jax.jit(functools.partial(trainer.eval_step, model=model))(
        new_state, {k: batch[k] for k in ('image', 'image_size')})
    return new_state, metrics, eval_out, model


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state_and_losses(batch_and_meta):
    batch, meta = batch_and_meta
    state32, metrics32, _, _ = _step('float32', batch, meta)
    state16, metrics16, eval16, model16 = _step('bfloat16', batch, meta)
    # Parameters, optimizer state, losses and boxes stay float32.
    for leaf in jax.tree_util.tree_leaves((state16.params, state16.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    for name, value in metrics16.items():
        assert value.dtype == jnp.float32, name
        assert np.isfinite(float(value)), name
    assert eval16['detection_boxes'].dtype == jnp.float32
    assert eval16['detection_scores'].dtype == jnp.float32
    # The network itself runs in bfloat16 ...
    hlo = jax.jit(functools.partial(trainer.eval_step, model=model16)).lower(
        state16, {k: batch[k] for k in ('image', 'image_size')}).as_text()
    convs = [line for line in hlo.splitlines()
             if 'stablehlo.convolution' in line or 'detectax_onednn_conv_forward' in line]
    assert convs and all('xbf16>' in line for line in convs), convs
    # ... and gives the float32 losses to bfloat16 precision.
    for name in ('total_loss', 'loss_rpn_cls', 'loss_roi_cls', 'loss_mask'):
        np.testing.assert_allclose(float(metrics16[name]), float(metrics32[name]),
                                   rtol=0.05, err_msg=name)
