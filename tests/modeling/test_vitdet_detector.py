"""The ViT backbone and the simple pyramid as registered parts of the detector."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.modeling import registry
from tests import tiny_vitdet_config


def test_vit_and_simple_fpn_are_builtin_parts():
    assert 'vit' in registry.names('backbone')
    assert 'simple_fpn' in registry.names('neck')
    spec = registry.spec_from_config('backbone', {'name': 'vit', 'size': 'L'})
    (only,) = registry.component_of('backbone', spec).feature_maps(spec)
    assert (only.name, only.stride, only.channels) == ('last_feat', 16, 1024)


def _model(config, num_classes=3):
    return MaskRCNNModel(config, {'num_classes': num_classes}).flax_model


def test_detector_with_vit_and_simple_fpn_gives_the_trunk_map_and_five_levels():
    model = _model(tiny_vitdet_config.get_config())
    images = jnp.zeros((2, 64, 96, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images,
                                                  jnp.array([[64, 96]] * 2)))
    backbone, pyramid = jax.eval_shape(
        lambda v: model.apply(v, images, method=model.extract_features), variables)
    assert {k: v.shape for k, v in backbone.items()} == {'last_feat': (2, 4, 6, 32)}
    assert [p.shape for p in pyramid] == [(2, 16, 24, 8), (2, 8, 12, 8), (2, 4, 6, 8),
                                          (2, 2, 3, 8), (2, 1, 2, 8)]
    # The trunk's parameters sit directly under body/ (the converters' paths).
    body = variables['params']['body']
    assert {'patch_embed', 'pos_embed', 'blocks_0', 'blocks_3'} <= set(body)
    assert body['blocks_1']['attn']['rel_pos_h'].shape == (2 * 32 - 1, 16)


def test_simple_fpn_on_a_multi_map_backbone_is_refused_by_name():
    config = tiny_vitdet_config.get_config()
    config.model.backbone = ml_collections.ConfigDict({'name': 'resnet', 'depth': 18,
                                                       'width': 8})
    with pytest.raises(ValueError, match="neck 'simple_fpn' needs a backbone with one map"):
        jax.eval_shape(lambda: _model(config).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.array([[64, 64]])))


def test_unknown_vit_key_is_named():
    config = tiny_vitdet_config.get_config()
    config.model.backbone.windw_size = 7
    with pytest.raises(KeyError, match='model.backbone.windw_size'):
        _model(config)
