"""Tests for modeling/backbones/resnet.py: strides, channels, freezing, norms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.modeling.backbones import resnet
from tests.variables import fill_variables


def _shapes(model, x, train=False):
    return jax.eval_shape(functools.partial(model.init, train=train), jax.random.PRNGKey(0), x)


@pytest.mark.parametrize('depth,channels', [(18, (8, 16, 32, 64)), (50, (32, 64, 128, 256))])
def test_output_strides_and_channels(depth, channels):
    model = resnet.ResNet(depth=depth, width=8, norm='frozen_bn')
    x = jnp.zeros((2, 64, 64, 3))
    variables = _shapes(model, x)
    out = jax.eval_shape(model.apply, variables, x)
    assert list(out) == ['c2', 'c3', 'c4', 'c5']
    for (name, y), stride, c in zip(out.items(), (4, 8, 16, 32), channels):
        assert y.shape == (2, 64 // stride, 64 // stride, c), name
    blocks = {k for k in variables['params'] if k.startswith('res')}
    assert len(blocks) == (8 if depth == 18 else 16)


def test_odd_input_size_rounds_up_like_pytorch():
    # Symmetric padding: 7x7/2 then 3x3/2 max pool: 50 -> 25 -> 13, then 7, 4, 2.
    model = resnet.ResNet(depth=18, width=4)
    x = jnp.zeros((1, 50, 38, 3))
    out = jax.eval_shape(model.apply, _shapes(model, x), x)
    assert [v.shape[1:3] for v in out.values()] == [(13, 10), (7, 5), (4, 3), (2, 2)]


@pytest.mark.parametrize('norm,collections,norm_params', [
    ('bn', {'params', 'batch_stats'}, True),
    ('frozen_bn', {'params', 'frozen'}, False),
    ('gn', {'params'}, True),
    ('none', {'params'}, False),
])
def test_norm_options_build(norm, collections, norm_params):
    model = resnet.ResNet(depth=18, width=8, norm=norm)
    x = jnp.zeros((1, 32, 32, 3))
    variables = _shapes(model, x, train=True)
    assert set(variables) == collections
    assert ('stem_norm' in variables['params']) == norm_params
    if norm == 'gn':
        assert variables['params']['stem_norm']['scale'].shape == (8,)
    if norm == 'frozen_bn':
        assert set(variables['frozen']['stem_norm']) == {'scale', 'bias', 'mean', 'var'}
    mutable = ['batch_stats'] if norm == 'bn' else False
    out = jax.eval_shape(functools.partial(model.apply, train=True, mutable=mutable),
                         variables, x)
    out = out[0] if mutable else out
    assert out['c5'].shape == (1, 1, 1, 64)


def test_bottleneck_stride_placement():
    for in_1x1, conv1_stride in ((True, 2), (False, 1)):
        block = resnet.Bottleneck(4, 2, 'none', False, stride_in_1x1=in_1x1)
        x = jnp.zeros((1, 8, 8, 16))
        variables = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)
        _, state = jax.eval_shape(
            functools.partial(block.apply, capture_intermediates=True, mutable=True),
            variables, x)
        conv1 = state['intermediates']['conv1']['__call__'][0]
        assert conv1.shape == (1, 8 // conv1_stride, 8 // conv1_stride, 4)


def test_unsupported_depth_is_an_error():
    with pytest.raises(ValueError, match='unsupported ResNet depth 42'):
        _shapes(resnet.ResNet(depth=42), jnp.zeros((1, 32, 32, 3)))


def _grads(freeze_at, output):
    """Largest |gradient| per top-level module of a loss on one output, in training."""
    model = resnet.ResNet(depth=18, width=4, norm='bn', freeze_at=freeze_at)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
    variables = fill_variables(_shapes(model, x, train=True), kernel_gain=2.0)

    @jax.jit
    def grad_fn(params):
        def loss(p):
            out, _ = model.apply({'params': p, 'batch_stats': variables['batch_stats']}, x,
                                 train=True, mutable=['batch_stats'])
            return jnp.mean(out[output] ** 2)
        return jax.grad(loss)(params)

    grads = grad_fn(variables['params'])
    return {k: max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(v))
            for k, v in grads.items()}


# The loss reads only the first output after the frozen part (so that XLA can
# drop the later stages and compile quickly); without freezing, the stem and
# every stage before that output would get gradient.
@pytest.mark.parametrize('freeze_at,output,frozen,trained', [
    (1, 'c2', ('stem_conv', 'stem_norm'), ('res2_block0', 'res2_block1')),
    (2, 'c3', ('stem_conv', 'stem_norm', 'res2_block0', 'res2_block1'),
     ('res3_block0', 'res3_block1')),
])
def test_freeze_at_stops_gradients(freeze_at, output, frozen, trained):
    grads = _grads(freeze_at, output)
    for name in frozen:
        assert grads[name] == 0.0, name
    for name in trained:
        assert grads[name] > 0.0, name
    assert all(n.startswith(resnet.frozen_prefixes(freeze_at)) for n in frozen)


def test_frozen_prefixes():
    assert resnet.frozen_prefixes(0) == ()
    assert resnet.frozen_prefixes(1) == ('stem_',)
    assert resnet.frozen_prefixes(3) == ('stem_', 'res2_', 'res3_')
