"""Tests for modeling/registry.py: parts chosen by config, registered from outside the project.

This module registers a toy backbone (and a one-map neck) the way a user's module would
(docs/extending.md shows the same code); a config that imports it selects the toy by name.
"""

import ast
import dataclasses
import functools
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from projects.maskrcnn import optim, trainer
from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.modeling import registry
from tests import run_utils, tiny_shapes_config

# ----------------------------------------------------------------------------
# A toy backbone, registered from this test module
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ToySpec:
    """`config.model.backbone` with name 'toy'."""
    channels: int = 8


class ToyBackbone(nn.Module):
    """A 4x4 patch convolution, then three stride-2 convolutions: maps s4, s8, s16, s32."""
    channels: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train=False):
        x = nn.Conv(self.channels, (4, 4), strides=4, dtype=self.dtype, name='patchify')(images)
        maps = {'s4': x}
        for stride in (8, 16, 32):
            x = nn.Conv(self.channels, (3, 3), strides=2, padding=1, dtype=self.dtype,
                        name=f'down{stride}')(nn.relu(x))
            maps[f's{stride}'] = x
        return maps


def toy_feature_maps(spec):
    return tuple(registry.FeatureMap(f's{s}', s, spec.channels) for s in (4, 8, 16, 32))


def build_toy(spec, dtype):
    return ToyBackbone(spec.channels, dtype)


registry.register_backbone('toy', ToySpec, build_toy, toy_feature_maps)


# A neck that makes the five levels out of the backbone's coarsest map alone (the shape
# of a ViTDet-style simple pyramid): it only reads the declared inputs.

@dataclasses.dataclass(frozen=True)
class OneMapSpec:
    channels: int = 16


class OneMapPyramid(nn.Module):
    source: str
    source_stride: int
    channels: int = 16

    @nn.compact
    def __call__(self, features, train=False):
        x = features[self.source]
        b, h, w, c = x.shape
        levels = []
        for i, stride in enumerate((4, 8, 16, 32, 64)):
            f = self.source_stride / stride
            size = (b, max(1, int(h * f)), max(1, int(w * f)), c)
            levels.append(nn.Conv(self.channels, (1, 1), name=f'level{i + 2}')(
                jax.image.resize(x, size, 'nearest')))
        return levels


def build_one_map(spec, inputs, dtype):
    del dtype
    source = max(inputs, key=lambda m: m.stride)
    return OneMapPyramid(source.name, source.stride, spec.channels)


registry.register_neck('one_map', OneMapSpec, build_one_map)


def toy_config(**backbone):
    config = tiny_shapes_config.get_config()
    config.model.backbone = ml_collections.ConfigDict({'name': 'toy', **backbone})
    return config


def _variables(config, num_classes=3):
    d = config.dataset_configs
    meta = {'num_classes': num_classes, 'input_shape': (-1, *d.image_size, 3),
            'max_instances': d.max_instances, 'gt_mask_size': d.gt_mask_size}
    model = MaskRCNNModel(config, meta)
    return jax.eval_shape(functools.partial(trainer.init_variables, model, meta=meta),
                          jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------
# Selection by config
# ----------------------------------------------------------------------------

def test_toy_backbone_is_selected_by_config():
    params = _variables(toy_config(channels=8))['params']
    assert set(params['body']) == {'patchify', 'down8', 'down16', 'down32'}
    assert params['body']['patchify']['kernel'].shape == (4, 4, 3, 8)
    # The FPN reads the toy's maps by their declared names, finest first.
    assert {k for k in params['neck'] if k.startswith('lateral_')} == {
        'lateral_s4', 'lateral_s8', 'lateral_s16', 'lateral_s32'}
    assert params['neck']['lateral_s4']['kernel'].shape == (1, 1, 8, 16)


def test_one_map_neck_fits_the_detector():
    config = toy_config()
    config.model.neck = ml_collections.ConfigDict({'name': 'one_map', 'channels': 16})
    params = _variables(config)['params']
    assert set(params['neck']) == {f'level{i}' for i in range(2, 7)}
    assert params['rpn_head']['conv0']['kernel'].shape == (3, 3, 16, 16)


def test_default_names_are_resnet_and_fpn():
    assert registry.DEFAULTS == {'backbone': 'resnet', 'neck': 'fpn'}
    config = tiny_shapes_config.get_config()
    assert config.model.backbone.name == 'resnet' and config.model.neck.name == 'fpn'
    assert {'toy', 'resnet'} <= set(registry.names('backbone'))


def test_toy_backbone_trains_one_step_through_main(tmp_path):
    config_file = tmp_path / 'toy_config.py'
    config_file.write_text(
        'from tests.modeling import test_registry  # registers the toy backbone\n'
        'def get_config():\n'
        '    return test_registry.toy_config(channels=8)\n')
    workdir = tmp_path / 'run'
    command = run_utils.main_command(
        str(workdir), str(tmp_path / 'tfds'), '--config.num_training_steps=1',
        '--config.log_summary_steps=1', '--config.checkpoint_steps=1',
        '--config.log_eval_steps=1', '--config.eval_max_examples=2',
        '--config.compute_validation_loss=False')
    command[2] = f'--config={config_file}'
    code, output = run_utils.run(command, run_utils.subprocess_env())
    assert code == 0, output[-3000:]
    scalars = run_utils.scalars(str(workdir))
    assert np.isfinite(scalars['train/total_loss'][1])
    # 'channels' is no ResNet setting: the run built the toy, or it would have failed.
    assert 'unknown config key' not in output


# ----------------------------------------------------------------------------
# Errors that name the key or list the choices
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['backbone', 'neck'])
def test_unknown_name_lists_the_registered_ones(kind):
    config = tiny_shapes_config.get_config()
    config.model[kind].name = 'resnot'
    with pytest.raises(KeyError, match=f"unknown {kind} 'resnot'") as info:
        MaskRCNNModel(config, {'num_classes': 3})
    for name in registry.names(kind):
        assert name in str(info.value)
    assert ('toy' in str(info.value)) == (kind == 'backbone')


def test_old_fpn_key_says_where_it_went():
    config = tiny_shapes_config.get_config()
    config.model.fpn.channels = 16          # as an older config file wrote it
    with pytest.raises(KeyError, match=r'model\.fpn\.channels is now model\.neck\.channels'):
        MaskRCNNModel(config, {'num_classes': 3})
    config = tiny_shapes_config.get_config()
    config.model.fpn = ml_collections.ConfigDict({'norm': 'gn'})
    with pytest.raises(KeyError, match=r'model\.fpn\.norm is now model\.neck\.norm'):
        MaskRCNNModel(config, {'num_classes': 3})


@pytest.mark.parametrize('kind,key', [('backbone', 'detph'), ('neck', 'chanels')])
def test_misspelt_key_of_a_part_is_named(kind, key):
    config = tiny_shapes_config.get_config()
    config.model[kind][key] = 1
    with pytest.raises(KeyError, match=rf'model\.{kind}\.{key}'):
        MaskRCNNModel(config, {'num_classes': 3})


def test_settings_of_another_part_are_named():
    config = tiny_shapes_config.get_config()
    config.model.backbone.name = 'toy'   # the ResNet keys stay: an error naming one
    with pytest.raises(KeyError, match=r"model\.backbone\.\w+: not a setting of backbone 'toy'"):
        MaskRCNNModel(config, {'num_classes': 3})


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="backbone 'resnet' is already registered"):
        registry.register_backbone('resnet', ToySpec, lambda spec, dtype: None,
                                   toy_feature_maps)
    with pytest.raises(TypeError, match='frozen dataclass'):
        registry.register_neck('dict_spec', dict, build_one_map)


def test_a_backbone_that_returns_other_maps_than_it_declares_is_an_error():
    @dataclasses.dataclass(frozen=True)
    class LiarSpec:
        channels: int = 8

    registry.register_backbone(
        'liar', LiarSpec, build_toy,
        lambda spec: tuple(registry.FeatureMap(f's{s}', s, 2 * spec.channels)
                           for s in (4, 8, 16, 32)))
    config = toy_config()
    config.model.backbone.name = 'liar'
    with pytest.raises(ValueError, match="backbone map 's4'.*declares stride 4 and 16 channels"):
        _variables(config)


def test_frozen_stages_come_from_the_backbone():
    config = tiny_shapes_config.get_config()
    config.model.backbone.freeze_at = 2
    spec = registry.spec_from_config('backbone', config.model.backbone.to_dict())
    assert registry.frozen_prefixes(spec) == ('stem_', 'res2_')
    assert registry.frozen_prefixes(ToySpec()) == ()
    params = {'body': {'stem_conv': {'kernel': np.ones(2)}, 'res3_block0': {'x': np.ones(2)}}}
    labels = optim.parameter_labels(params, registry.frozen_prefixes(spec))
    assert labels['body']['stem_conv']['kernel'] == 'frozen'
    assert labels['body']['res3_block0']['x'] == 'decay'


# ----------------------------------------------------------------------------
# The detector names no concrete part
# ----------------------------------------------------------------------------

MODELING = pathlib.Path(__file__).resolve().parents[2] / 'projects' / 'maskrcnn' / 'modeling'
# The registry and the parts' own files (which register themselves) may name them.
PART_FILES = ('registry.py', 'backbones', 'necks')
CONCRETE = ('resnet', 'fpn')


def _names_in_code(source):
    """Identifiers, imported modules and non-docstring strings of a Python file."""
    tree = ast.parse(source)
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)
                  and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield getattr(node, 'module', None) or ''
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            yield node.value


def test_no_modeling_file_outside_the_parts_names_a_concrete_part():
    checked = []
    for path in MODELING.rglob('*.py'):
        relative = path.relative_to(MODELING)
        if relative.parts[0] in PART_FILES:
            continue
        checked.append(str(relative))
        for name in _names_in_code(path.read_text()):
            assert not any(c in name.lower() for c in CONCRETE), (str(relative), name)
    assert 'detector.py' in checked and os.path.join('heads', 'bbox_head.py') in checked
