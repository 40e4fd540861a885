"""MaskRCNNModel: the Scenic model class (Flax module, losses, metrics)."""

import dataclasses
from typing import Any
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections

from projects.maskrcnn import losses
from projects.maskrcnn.modeling import registry, specs
from projects.maskrcnn.modeling.detector import MaskRCNN
from projects.maskrcnn.scenic_compat import BaseModel

# Keys of `config.model` beyond the spec groups of modeling/specs.py.
LOSS_KEYS = ('loss_weights', 'rpn_smooth_l1_beta', 'roi_smooth_l1_beta', 'rpn_loss_normalizer')
# The registered parts' groups (`name` plus the named part's settings) and the
# detector fields they fill.
PART_FIELDS = {'backbone': 'backbone', 'neck': 'neck_spec'}
# Groups that moved: old key -> new key.
MOVED_KEYS = {'fpn': 'neck'}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def default_model_config() -> ml_collections.ConfigDict:
    """`config.model` with the reference (Detectron2 R50-FPN) values."""
    cfg = {kind: registry.default_config(kind) for kind in PART_FIELDS}
    # Moved groups stay, empty, so that an older config's `config.model.fpn.channels = 64`
    # reaches the error that names the new key instead of failing on a missing attribute.
    cfg.update({old: {} for old in MOVED_KEYS})
    cfg.update({name: dataclasses.asdict(cls()) for name, cls in specs.SPECS.items()})
    cfg['loss_weights'] = dict.fromkeys(losses.LOSS_TERMS, 1.0)
    cfg['rpn_smooth_l1_beta'] = 0.0
    cfg['roi_smooth_l1_beta'] = 0.0
    cfg['rpn_loss_normalizer'] = 'batch_size_per_image'   # torchvision: 'sampled'
    return ml_collections.ConfigDict(cfg)


def _moved_key_error(old: str, group: Any) -> KeyError:
    new = MOVED_KEYS[old]
    keys = list(group.keys()) if hasattr(group, 'keys') else ['*']
    moves = '; '.join(f'model.{old}.{k} is now model.{new}.{k}' for k in keys)
    return KeyError(f'config key model.{old} moved to model.{new} (model.{new}.name '
                    f'{registry.DEFAULTS[new]!r} and its settings): {moves}')


def model_specs(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The detector's spec fields from `config.model`, naming any unknown or moved key."""
    for old in MOVED_KEYS:
        if model_config.get(old):  # present and not the empty placeholder
            raise _moved_key_error(old, model_config[old])
    known = set(specs.SPECS) | set(PART_FIELDS) | set(LOSS_KEYS) | set(MOVED_KEYS)
    unknown = set(model_config.keys()) - known
    if unknown:
        raise KeyError(f'unknown config key(s) model.{", model.".join(sorted(unknown))}; '
                       f'known: {", ".join(sorted(known))}')
    fields = {name: specs.build_spec(name, model_config[name].to_dict())
              for name in specs.SPECS if name in model_config}
    for kind, field in PART_FIELDS.items():
        if kind in model_config:
            fields[field] = registry.spec_from_config(kind, model_config[kind].to_dict())
    return fields


class MaskRCNNModel(BaseModel):
    """Mask R-CNN as a Scenic model.

    `config.model` holds the spec groups of modeling/specs.py and the registered
    backbone and neck (`model.backbone.name`, `model.neck.name`); `config.dtype`
    the compute dtype; `dataset_meta_data['num_classes']` the foreground classes.
    `flax_model.apply(variables, image, image_size, gt, train=True,
    rngs={'sampling': key})` returns the outputs that `loss_function` consumes.
    """

    def build_flax_model(self) -> MaskRCNN:
        dtype_name = self.config.get('dtype', 'float32')
        if dtype_name not in DTYPES:
            raise ValueError(f'unknown config.dtype {dtype_name!r}; expected one of {sorted(DTYPES)}')
        model_config = self.config.get('model') or ml_collections.ConfigDict()
        return MaskRCNN(num_classes=int(self.dataset_meta_data['num_classes']),
                        dtype=DTYPES[dtype_name], **model_specs(model_config))

    def default_flax_model_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({'model': default_model_config(), 'dtype': 'float32'})

    def _loss_settings(self):
        model_config = self.config.get('model') or ml_collections.ConfigDict()
        weights = dict(model_config.get('loss_weights') or {})
        unknown = set(weights) - set(losses.LOSS_TERMS)
        if unknown:
            raise KeyError(f'unknown config key(s) model.loss_weights.{sorted(unknown)}; '
                           f'terms are {losses.LOSS_TERMS}')
        return (weights, model_config.get('rpn_smooth_l1_beta', 0.0),
                model_config.get('roi_smooth_l1_beta', 0.0),
                model_config.get('rpn_loss_normalizer', 'batch_size_per_image'))

    def loss_function(self, outputs: dict, batch: dict,
                      model_params: Any = None) -> jnp.ndarray:
        """Total weighted loss of the detector's training outputs.

        Weight decay is applied by the optimizer (it must skip norm parameters),
        so `model_params` is unused.
        """
        del batch, model_params
        total, _ = losses.total_loss(outputs, *self._loss_settings())
        return total

    def get_metrics_fn(self, split: str | None = None) -> Callable[[dict, dict], dict]:
        """Returns fn(outputs, batch) -> {name: scalar}: every loss term, the
        weighted total, sampling statistics (training outputs only) and the batch's
        instances left out beyond max_instances (`truncated_instances`)."""
        del split
        settings = self._loss_settings()

        def metrics_fn(outputs, batch):
            total, terms = losses.total_loss(outputs, *settings)
            metrics = {'total_loss': total, **{f'loss_{k}': v for k, v in terms.items()},
                       **losses.count_foreground(outputs)}
            if 'gt_truncated' in batch:  # instances beyond max_instances in this batch
                metrics['truncated_instances'] = jnp.sum(batch['gt_truncated']).astype(
                    jnp.float32)
            return metrics

        return metrics_fn

    get_metrics_fn_jit = get_metrics_fn
