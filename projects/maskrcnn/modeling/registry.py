"""Backbones and necks chosen by name: the detector asks for "the backbone", never for one.

A config picks each part by name and gives its settings next to the name:

  config.model.backbone.name = 'resnet'     # the default; other keys are ResNetSpec's
  config.model.backbone.depth = 101
  config.model.neck.name = 'fpn'            # the default; other keys are FPNSpec's
  config.model.neck.channels = 256

This is Scenic's `backbone_name` + `backbone_args` (and Detectron2's BACKBONE_REGISTRY)
folded into one group: `name` says which part, every other key is a field of that part's
typed spec, so a misspelt key is an error that names it (`model.backbone.detph`).

A part registers itself once, in its own file (`register_backbone` / `register_neck`), or
from any module a config imports (see docs/extending.md):

- a backbone gives `build(spec, dtype) -> nn.Module` whose `__call__(images [B, H, W, 3],
  train)` returns a dict of named maps [B, H / s, W / s, C], and `feature_maps(spec)`, the
  `FeatureMap`s (name, stride s, channels C) it returns;
- a neck gives `build(spec, inputs, dtype) -> nn.Module`, `inputs` being the backbone's
  declared `FeatureMap`s, whose `__call__(features, train)` maps that dict to the pyramid
  the RPN and RoI heads read: a list [P2, P3, ...] of maps of strides 4, 8, 16, ...

The built-in parts are imported on the first look-up (`BUILTIN_MODULES`).
"""

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn

KINDS = ('backbone', 'neck')
DEFAULTS = {'backbone': 'resnet', 'neck': 'fpn'}
# Modules whose import registers the built-in parts.
BUILTIN_MODULES = (
    'projects.maskrcnn.modeling.backbones.resnet',
    'projects.maskrcnn.modeling.necks.fpn',
    'projects.maskrcnn.modeling.backbones.vit',
    'projects.maskrcnn.modeling.necks.simple_fpn',
)
# Spec classes that older code imported from modeling/specs.py: name -> (kind, part).
LEGACY_SPEC_NAMES = {'BackboneSpec': ('backbone', 'resnet'), 'FPNSpec': ('neck', 'fpn')}


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """One map a backbone returns: its key, stride in input pixels, and channels."""
    name: str
    stride: int
    channels: int


@dataclasses.dataclass(frozen=True)
class Component:
    """A registered part. `feature_maps` and `frozen_prefixes` are backbones' only."""
    kind: str
    name: str
    spec: type
    build: Callable[..., nn.Module]
    feature_maps: Callable[[Any], tuple[FeatureMap, ...]] | None = None
    frozen_prefixes: Callable[[Any], tuple[str, ...]] | None = None


_REGISTRY: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def _register(component: Component) -> Component:
    if not (dataclasses.is_dataclass(component.spec)
            and component.spec.__dataclass_params__.frozen):
        raise TypeError(f'the spec of {component.kind} {component.name!r} must be a frozen '
                        f'dataclass, got {component.spec!r}')
    table = _REGISTRY[component.kind]
    old = table.get(component.name)
    same_code = old is not None and all(
        getattr(old.build, a, None) == getattr(component.build, a, None)
        for a in ('__module__', '__qualname__'))
    if old is not None and not same_code:  # a module imported again may register again
        raise ValueError(f'{component.kind} {component.name!r} is already registered '
                         f'(by {old.build.__module__}.{old.build.__qualname__})')
    for other in table.values():
        if other.spec is component.spec and other.name != component.name:
            raise ValueError(f'{component.spec.__name__} is already the spec of '
                             f'{component.kind} {other.name!r}; give each part its own class')
    table[component.name] = component
    return component


def register_backbone(name: str, spec: type, build: Callable[[Any, Any], nn.Module],
                      feature_maps: Callable[[Any], tuple[FeatureMap, ...]],
                      frozen_prefixes: Callable[[Any], tuple[str, ...]] | None = None
                      ) -> Component:
    """Registers a backbone under `name` (the value of `config.model.backbone.name`).

    Args:
      name: the name configs select it by.
      spec: a frozen dataclass of its settings (the other keys of `config.model.backbone`).
      build: (spec, dtype) -> a Flax module mapping [B, H, W, 3] images (and `train`)
        to a dict of feature maps.
      feature_maps: spec -> the `FeatureMap`s that dict holds.
      frozen_prefixes: spec -> prefixes of its parameter names that get no update
        (ResNet's `freeze_at`); none by default.
    """
    return _register(Component('backbone', name, spec, build, feature_maps, frozen_prefixes))


def register_neck(name: str, spec: type,
                  build: Callable[[Any, tuple[FeatureMap, ...], Any], nn.Module]) -> Component:
    """Registers a neck under `name` (the value of `config.model.neck.name`).

    `build(spec, inputs, dtype)` gets the backbone's declared `FeatureMap`s and returns a
    Flax module mapping that dict of maps (and `train`) to the list [P2, P3, ...].
    """
    return _register(Component('neck', name, spec, build))


def names(kind: str) -> list[str]:
    """The registered names of `kind` ('backbone' or 'neck')."""
    _load_builtins()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> Component:
    """The part registered as `name`; an unknown name is an error listing the known ones."""
    _load_builtins()
    if name not in _REGISTRY[kind]:
        raise KeyError(f'unknown {kind} {name!r} (config.model.{kind}.name); registered: '
                       f'{", ".join(names(kind))}. A part registers itself with '
                       f'registry.register_{kind} in a module the config imports.')
    return _REGISTRY[kind][name]


def component_of(kind: str, spec: Any) -> Component:
    """The part whose spec class `spec` is an instance of."""
    _load_builtins()
    for component in _REGISTRY[kind].values():
        if type(spec) is component.spec:  # pylint: disable=unidiomatic-typecheck
            return component
    raise TypeError(f'{type(spec).__name__} is not the spec of a registered {kind}; '
                    f'registered: {", ".join(names(kind))}')


def _freeze(value):
    """Lists from a config become tuples, so that specs stay hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def build_dataclass(cls: type, values: dict, prefix: str):
    """`cls(**values)`, naming (with `prefix`) any key that is not one of its fields."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise KeyError(f'unknown config key {prefix}.{key}; known keys: '
                           f'{", ".join(sorted(known))}')
    return cls(**{k: _freeze(v) for k, v in values.items()})


def spec_from_config(kind: str, values: dict) -> Any:
    """The spec of `config.model.<kind>` as a plain dict: its `name` picks the part
    (the default when absent), the other keys are that part's settings."""
    values = dict(values)
    name = values.pop('name', DEFAULTS[kind])
    component = get(kind, name)
    known = {f.name for f in dataclasses.fields(component.spec)}
    for key in values:
        if key not in known:
            raise KeyError(
                f'unknown config key model.{kind}.{key}: not a setting of {kind} {name!r} '
                f'(its keys: name, {", ".join(sorted(known))}). A config that changes '
                f'model.{kind}.name replaces the whole group, e.g. config.model.{kind} = '
                f"ml_collections.ConfigDict({{'name': {name!r}, ...}}).")
    return build_dataclass(component.spec, values, f'model.{kind}')


def default_config(kind: str) -> dict[str, Any]:
    """`config.model.<kind>` of the default part: its name and its spec's defaults."""
    component = get(kind, DEFAULTS[kind])
    return {'name': component.name, **dataclasses.asdict(component.spec())}


def legacy_spec(name: str) -> type:
    """The spec class older code imported from modeling/specs.py under `name`."""
    if name not in LEGACY_SPEC_NAMES:
        raise AttributeError(name)
    return get(*LEGACY_SPEC_NAMES[name]).spec


class Parts(nn.Module, kw_only=True):
    """The detector's registered parts, as keyword-only fields a detector inherits.

    Attributes:
      backbone: the spec of a registered backbone (its class says which); None for
        the default backbone with its default settings.
      neck_spec: the spec of a registered neck; None for the default neck. (The neck
        module itself is named `neck` in the parameters.)
      fpn: the former name of `neck_spec`, kept so that older code builds the same model.
    """
    backbone: Any = None
    neck_spec: Any = None
    fpn: Any = None

    def build_parts(self, dtype: Any) -> tuple[nn.Module, nn.Module, tuple[FeatureMap, ...]]:
        """The backbone and neck modules (unbound, for `setup`) and the backbone's maps."""
        if self.fpn is not None and self.neck_spec is not None:
            raise ValueError('give the neck spec as neck_spec or as its older name fpn, not both')
        backbone = self.backbone if self.backbone is not None else spec_from_config('backbone', {})
        neck = self.neck_spec if self.neck_spec is not None else self.fpn
        neck = neck if neck is not None else spec_from_config('neck', {})
        body = component_of('backbone', backbone)
        maps = tuple(body.feature_maps(backbone))
        return (body.build(backbone, dtype), component_of('neck', neck).build(neck, maps, dtype),
                maps)


def frozen_prefixes(backbone_spec: Any) -> tuple[str, ...]:
    """Prefixes of the backbone's parameter names that its spec freezes."""
    component = component_of('backbone', backbone_spec)
    return tuple(component.frozen_prefixes(backbone_spec)) if component.frozen_prefixes else ()
