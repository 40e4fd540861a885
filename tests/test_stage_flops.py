"""benchmarks/stage_flops.py: its convolution and dot FLOPs are XLA's, op by op,
and each op lands in the stage and pass its module path names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from benchmarks import stage_flops


def _counted(fn, *args) -> tuple[float, float, dict]:
    lowered = jax.jit(fn).lower(*args)
    stages, xla = stage_flops.lowered_stage_flops(lowered)
    ours = sum(v for d in stages.values() for v in d.values())
    return ours, xla, stages


def _conv(x, w, strides=(1, 1), padding=((1, 1), (1, 1)), groups=1, lhs_dilation=None,
          rhs_dilation=None):
    return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=groups)


@pytest.mark.parametrize('kwargs,in_ch', [
    ({}, 8),                                                      # 3x3, padded
    ({'strides': (2, 2), 'padding': ((3, 3), (3, 3))}, 8),        # 7x7 stem-like
    ({'groups': 4}, 8),                                           # grouped
    ({'lhs_dilation': (2, 2), 'padding': ((2, 1), (2, 1))}, 8),   # transposed
    ({'rhs_dilation': (2, 2), 'padding': ((2, 2), (2, 2))}, 8),   # atrous
])
def test_convolution_flops_are_xlas_taps_inside_the_input(kwargs, in_ch):
    kernel = 7 if 'strides' in kwargs else 3
    x = jnp.ones((2, 11, 9, in_ch))
    w = jnp.ones((kernel, kernel, in_ch // kwargs.get('groups', 1), 12))
    ours, xla, _ = _counted(lambda x, w: _conv(x, w, **kwargs), x, w)
    assert ours == xla and ours > 0


def test_gradient_convolutions_and_batched_dots_are_counted_as_xla_counts_them():
    x, w = jnp.ones((2, 10, 10, 6)), jnp.ones((3, 3, 6, 5))
    a, b = jnp.ones((4, 7, 9)), jnp.ones((4, 9, 3))

    def step(x, w, a, b):
        # The cotangents are inputs, so the program holds only convolutions and dots.
        y, vjp = jax.vjp(lambda x, w: _conv(x, w, strides=(2, 2)), x, w)
        gx, gw = vjp(jnp.ones_like(y) * a[0, 0, 0])
        return gx, gw, jnp.einsum('bij,bjk->bik', a, b)
    ours, xla, _ = _counted(step, x, w, a, b)
    assert ours == pytest.approx(xla, rel=1e-9)
    assert ours > 2 * 4 * 7 * 9 * 3


def test_an_op_in_a_called_function_counts_once_per_call_with_its_callers_path():
    inner = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((8, 16))

    def step(a):
        with jax.named_scope('body'):
            x = inner(a, a.T)
        with jax.named_scope('neck'):
            return inner(x, a)
    ours, xla, stages = _counted(step, a)
    assert ours == xla == 2 * 8 * 16 * 8 + 2 * 8 * 8 * 16
    assert stages['body']['forward'] == 2 * 8 * 16 * 8
    assert stages['fpn']['forward'] == 2 * 8 * 8 * 16


def test_a_loop_body_counts_once_per_iteration_where_xla_counts_it_once():
    a, b = jnp.ones((5, 8, 16)), jnp.ones((16, 4))

    def step(a, b):
        with jax.named_scope('body'):
            return jax.lax.map(lambda x: x @ b, a)
    ours, xla, stages = _counted(step, a, b)
    assert ours == stages['body']['forward'] == 5 * 2 * 8 * 16 * 4
    assert xla == pytest.approx(2 * 8 * 16 * 4, rel=0.05)   # one pass over the body
    text = jax.jit(step).lower(a, b).as_text(dialect='hlo')
    assert stage_flops.loop_flops_uncounted(text) == 4 * 2 * 8 * 16 * 4
    compiled = jax.jit(step).lower(a, b).compile().as_text()   # XLA's known_trip_count
    assert sum(stage_flops.hlo_flops(compiled).values()) == ours


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name='body')(x)
        x = nn.Dense(4, name='rpn_head')(x)
        return nn.Dense(2, name='mask_predictor')(x)


def test_module_paths_name_the_stage_and_the_backward_pass():
    model, x = _Tiny(), jnp.ones((1, 6, 6, 3))
    params = model.init(jax.random.PRNGKey(0), x)

    def loss(params, x):
        return jnp.sum(model.apply(params, x) ** 2)
    _, _, stages = _counted(jax.grad(loss), params, x)
    for stage in ('body', 'rpn', 'mask_head'):
        assert stages[stage]['forward'] > 0 and stages[stage]['backward'] > 0, (stage, stages)
    for stage in ('fpn', 'roi_align', 'box_head'):
        assert stages[stage] == {'forward': 0.0, 'backward': 0.0}, (stage, stages)
    # The body's forward: 2 * 36 positions * 4 outputs * 3 channels * the taps inside.
    assert stages['body']['forward'] == 2 * 4 * 3 * 16 ** 2
    assert stage_flops.stage_of('jvp(MaskRCNN)/MaskRCNN._train_outputs/box_predictor/fc1') \
        == 'box_head'
    assert stage_flops.stage_of('MaskRCNN._train_outputs/MaskRCNN._pool/vmap()') == 'roi_align'
    assert stage_flops.stage_of('MaskRCNN.extract_features/neck/output_c2') == 'fpn'
    assert stage_flops.stage_of('optax/adam') == 'other'
    assert stage_flops.is_backward('transpose(jvp(MaskRCNN))/MaskRCNN.propose/rpn_head')


def test_stage_time_counts_a_loops_body_thunks_not_the_loop_around_them(tmp_path):
    import gzip
    import json

    from benchmarks import profile_step
    events = [{'ph': 'X', 'dur': dur, 'args': {'hlo_op': op}} for op, dur in
              (('while.5', 100.0), ('dot_fusion', 60.0), ('copy.3', 30.0), ('conditional', 9.0))]
    trace = tmp_path / 'trace.json.gz'
    with gzip.open(trace, 'wt') as f:
        json.dump({'traceEvents': events}, f)
    scopes = {'while.5': 'jit(step)/body/attn/while', 'dot_fusion': 'jit(step)/body/attn/dot',
              'copy.3': 'jit(step)/neck/copy', 'conditional': 'jit(step)/body/cond'}
    totals, total = profile_step.summarise(str(trace), scopes, 'scope', 1)
    assert totals == {'body': 60.0, 'neck': 30.0} and total == 90.0
