"""Tests for modeling/backbones/vit.py (parity with transformers' VitDet is in
tests/tools/test_vitdet_parity.py)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.modeling.backbones import vit

TINY = {'width': 16, 'depth': 2, 'num_heads': 2, 'global_blocks': (1,), 'image_size': 96}


def _count(size: str) -> int:
    """Detectron2's ViT parameter count, written out from its definition.

    Per block: qkv 3C^2 + 3C, proj C^2 + C, fc1 4C^2 + 4C, fc2 4C^2 + C, two
    LayerNorms 4C, i.e. 12C^2 + 13C; rel-pos 2 (2S - 1) d with S = 14 in
    windowed blocks and 1024 / 16 = 64 in global ones; patch embedding
    16 * 16 * 3 * C + C; position table (1 + 14 * 14) C. No class token, no final norm.
    """
    row = vit.VIT_SIZES[size]
    c, d = row.width, row.width // row.num_heads
    blocks = row.depth * (12 * c * c + 13 * c)
    rel = sum(2 * (2 * (64 if i in row.global_blocks else 14) - 1) * d for i in range(row.depth))
    return blocks + rel + 16 * 16 * 3 * c + c + 197 * c


@pytest.mark.parametrize('size, expected', [
    ('B', 85_889_024), ('L', 303_432_704), ('H', 631_116_800)])
def test_parameter_counts_of_the_three_sizes(size, expected):
    assert _count(size) == expected
    shapes = jax.eval_shape(vit.ViTSpec(size=size).build().init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 1024, 1024, 3)))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == expected
    out = jax.eval_shape(vit.ViTSpec(size=size).build().apply, shapes,
                         jnp.zeros((1, 1024, 1024, 3)))
    assert out.shape == (1, 64, 64, vit.VIT_SIZES[size].width)


def test_parameter_names_mirror_pytorch():
    params = jax.jit(vit.ViT(**TINY).init)(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 32, 48, 3)))['params']
    names = {'/'.join(k) for k in flax.traverse_util.flatten_dict(params)}
    block = {'norm1/scale', 'norm1/bias', 'attn/qkv/kernel', 'attn/qkv/bias',
             'attn/proj/kernel', 'attn/proj/bias', 'attn/rel_pos_h', 'attn/rel_pos_w',
             'norm2/scale', 'norm2/bias', 'mlp/fc1/kernel', 'mlp/fc1/bias',
             'mlp/fc2/kernel', 'mlp/fc2/bias'}
    assert names == ({'patch_embed/proj/kernel', 'patch_embed/proj/bias', 'pos_embed'}
                     | {f'blocks_{i}/{n}' for i in range(2) for n in block})
    assert params['pos_embed'].shape == (1, 197, 16)
    assert params['blocks_0']['attn']['rel_pos_h'].shape == (27, 8)   # windowed: 2 * 14 - 1
    assert params['blocks_1']['attn']['rel_pos_w'].shape == (11, 8)   # global: 2 * 96/16 - 1
    assert not np.any(params['blocks_1']['attn']['rel_pos_h'])       # zero init


def test_window_partition_pads_with_zeros_and_round_trips():
    x = jnp.arange(2 * 5 * 17 * 3, dtype=jnp.float32).reshape(2, 5, 17, 3) + 1
    windows = vit.window_partition(x, 7)
    assert windows.shape == (2 * 1 * 3, 7, 7, 3)
    np.testing.assert_array_equal(windows[0, :5, :7], x[0, :5, :7])
    np.testing.assert_array_equal(windows[2, :5, :3], x[0, :5, 14:17])
    assert not np.any(windows[2, 5:]) and not np.any(windows[2, :, 3:])
    np.testing.assert_array_equal(vit.window_unpartition(windows, 7, (5, 17)), x)


def test_rel_pos_table_by_hand():
    table = jnp.array([[1.0], [2.0], [3.0]])  # rows for offsets -1, 0, +1
    np.testing.assert_array_equal(vit.rel_pos_table(2, 2, table)[..., 0], [[2, 1], [3, 2]])
    # A table of another length is resized linearly to 2 * 3 - 1 = 5 rows first.
    resized = vit.rel_pos_table(3, 3, table)
    assert resized.shape == (3, 3, 1)
    np.testing.assert_allclose(resized[1, 1, 0], 2.0)  # offset 0, the middle row


def _tiny_variables(model, x, seed=0):
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), x)
    # Nonzero rel-pos tables, so that they take part.
    return jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(len(p)), v.shape)
        if 'rel_pos' in str(p[-1]) else v, variables)


def test_windowed_blocks_keep_tokens_inside_their_window():
    model = vit.ViT(width=16, depth=2, num_heads=2, global_blocks=(), window_size=2,
                    image_size=64)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 64, 80, 3))  # 4 x 5 tokens
    variables = _tiny_variables(model, x)
    apply = jax.jit(model.apply)
    y0 = apply(variables, x)
    y1 = apply(variables, x.at[:, :16, :16].add(1.0))  # token (0, 0)
    changed = np.abs(np.asarray(y1 - y0)).max(axis=(0, 3)) > 0
    expected = np.zeros((4, 5), bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(changed, expected)
    global_model = model.clone(global_blocks=(1,))
    g = _tiny_variables(global_model, x)
    apply = jax.jit(global_model.apply)
    diff = apply(g, x.at[:, :16, :16].add(1.0)) - apply(g, x)
    assert np.all(np.abs(np.asarray(diff)).max(axis=(0, 3)) > 0)


def test_remat_and_bfloat16_compute_the_same_map():
    model = vit.ViT(**TINY)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 48, 80, 3))
    variables = _tiny_variables(model, x)

    def value_and_grad(m):
        return jax.jit(jax.value_and_grad(
            lambda params: jnp.sum(m.apply({'params': params}, x) ** 2)))(variables['params'])

    (v, g), (v_remat, g_remat) = value_and_grad(model), value_and_grad(model.clone(remat=True))
    np.testing.assert_allclose(v_remat, v, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    y = jax.jit(model.apply)(variables, x)
    y16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x)
    assert y16.dtype == jnp.bfloat16
    assert float(jnp.abs(y16.astype(jnp.float32) - y).max() / jnp.abs(y).max()) < 0.05


def test_global_attention_in_chunks_computes_the_same_map_and_gradients():
    # 80 x 48 pixels: 5 x 3 tokens, so 2 and 3 chunks of query rows pad the grid.
    model = vit.ViT(**TINY)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 80, 48, 3))
    variables = _tiny_variables(model, x)
    rel_h = variables['params']['blocks_1']['attn']['rel_pos_h']
    assert float(jnp.abs(rel_h).min()) > 0   # the rel-pos terms take part

    def value_and_grad(m):
        return jax.jit(jax.value_and_grad(
            lambda params: jnp.sum(jnp.sin(m.apply({'params': params}, x)))))(variables['params'])

    v, g = value_and_grad(model)
    for chunks in (2, 3, 5):
        v_c, g_c = value_and_grad(model.clone(global_attention_chunks=chunks))
        np.testing.assert_allclose(v_c, v, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_c)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match='global_attention_chunks must be >= 1, got 0'):
        vit.ViTSpec(global_attention_chunks=0).resolved()


def test_attention_chunks_hold_a_part_of_the_logits():
    # One global block on a 64 x 64 grid (1024 x 1024 pixels): its float32 logits are
    # 2 x 4096 x 4096 x 4 bytes = 134 MB; in 8 chunks the step holds about an eighth.
    def temporaries(chunks):
        block = vit.Block(2, 1.0, 0, (64, 64), query_chunks=chunks)
        x = jax.ShapeDtypeStruct((1, 64, 64, 16), jnp.float32)
        params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x) ** 2)))
        return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temporaries(1), temporaries(8)
    assert whole > 2 * 134e6 and chunked < whole / 4, (whole, chunked)


def test_drop_path_only_in_training():
    model = vit.ViT(**{**TINY, 'drop_path_rate': 0.5})
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    rngs = {'sampling': jax.random.PRNGKey(3)}
    y = jax.jit(model.apply)(variables, x)
    y_train = jax.jit(lambda v: model.apply(v, x, train=True, rngs=rngs))(variables)
    assert not np.allclose(y_train, y)
    no_drop = model.clone(drop_path_rate=0.0)
    np.testing.assert_allclose(
        jax.jit(lambda v: no_drop.apply(v, x, train=True, rngs=rngs))(variables), y, atol=1e-6)


def test_spec_fills_the_size_table_and_names_bad_values():
    fields = vit.ViTSpec(size='L').resolved()
    assert (fields['width'], fields['depth'], fields['num_heads']) == (1024, 24, 16)
    assert fields['global_blocks'] == (5, 11, 17, 23) and fields['drop_path_rate'] == 0.4
    assert vit.ViTSpec(size='H', depth=4, global_blocks=[3]).resolved()['global_blocks'] == (3,)
    with pytest.raises(ValueError, match="backbone.size='X'"):
        vit.ViTSpec(size='X').resolved()
    with pytest.raises(ValueError, match='num_heads 5'):
        vit.ViTSpec(width=16, num_heads=5).resolved()
    with pytest.raises(ValueError, match=r'global_blocks \[7\]'):
        vit.ViT(**{**TINY, 'global_blocks': (7,)}).init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, 32, 32, 3)))
