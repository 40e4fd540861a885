"""Tests for modeling/specs.py: building specs from config dicts."""

import dataclasses

import pytest

from projects.maskrcnn.modeling import specs


def test_build_spec_unknown_key_names_it():
    with pytest.raises(KeyError, match=r'model\.rpn\.nms_treshold') as info:
        specs.build_spec('rpn', {'nms_threshold': 0.6, 'nms_treshold': 0.5})
    assert 'nms_threshold' in str(info.value)  # the known keys are listed


def test_build_spec_known_keys_and_lists_become_tuples():
    spec = specs.build_spec('anchors', {'sizes': [[16], [32], [64], [128], [256]],
                                        'aspect_ratios': [1.0]})
    assert spec.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert spec.aspect_ratios == (1.0,)
    assert spec.offset == 0.0
    hash(spec)  # usable as a static Flax attribute


def test_build_spec_empty_gives_defaults():
    for name, cls in specs.SPECS.items():
        assert specs.build_spec(name, {}) == cls()


def test_build_spec_unknown_spec_name():
    with pytest.raises(KeyError):
        specs.build_spec('rpn_head', {})


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        specs.RPNSpec().nms_threshold = 0.1
