"""MaskRCNNModel: the Scenic model class (Flax module, losses, metrics)."""

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections

from projects.maskrcnn import losses
from projects.maskrcnn.modeling import specs
from projects.maskrcnn.modeling.detector import MaskRCNN
from projects.maskrcnn.scenic_compat import BaseModel

# Keys of `config.model` beyond the spec groups of modeling/specs.py.
LOSS_KEYS = ('loss_weights', 'rpn_smooth_l1_beta', 'roi_smooth_l1_beta')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def default_model_config() -> ml_collections.ConfigDict:
    """`config.model` with the reference (Detectron2 R50-FPN) values."""
    cfg = {name: dataclasses.asdict(cls()) for name, cls in specs.SPECS.items()}
    cfg['loss_weights'] = {name: 1.0 for name in losses.LOSS_TERMS}
    cfg['rpn_smooth_l1_beta'] = 0.0
    cfg['roi_smooth_l1_beta'] = 0.0
    return ml_collections.ConfigDict(cfg)


def _model_specs(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    unknown = set(model_config.keys()) - set(specs.SPECS) - set(LOSS_KEYS)
    if unknown:
        raise KeyError(f'unknown config key(s) model.{", model.".join(sorted(unknown))}; '
                       f'known: {", ".join(sorted(set(specs.SPECS) | set(LOSS_KEYS)))}')
    return {name: specs.build_spec(name, model_config[name].to_dict())
            for name in specs.SPECS if name in model_config}


class MaskRCNNModel(BaseModel):
    """Mask R-CNN as a Scenic model.

    `config.model` holds the spec groups of modeling/specs.py; `config.dtype`
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
                        dtype=DTYPES[dtype_name], **_model_specs(model_config))

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
                model_config.get('roi_smooth_l1_beta', 0.0))

    def loss_function(self, outputs: dict, batch: dict,
                      model_params: Any = None) -> jnp.ndarray:
        """Total weighted loss of the detector's training outputs.

        Weight decay is applied by the optimizer (it must skip norm parameters),
        so `model_params` is unused.
        """
        del batch, model_params
        weights, rpn_beta, roi_beta = self._loss_settings()
        total, _ = losses.total_loss(outputs, weights, rpn_beta, roi_beta)
        return total

    def get_metrics_fn(self, split: str | None = None) -> Callable[[dict, dict], dict]:
        """Returns fn(outputs, batch) -> {name: scalar}: every loss term, the
        weighted total, sampling statistics (training outputs only) and the batch's
        instances left out beyond max_instances (`truncated_instances`)."""
        del split
        weights, rpn_beta, roi_beta = self._loss_settings()

        def metrics_fn(outputs, batch):
            total, terms = losses.total_loss(outputs, weights, rpn_beta, roi_beta)
            metrics = {'total_loss': total, **{f'loss_{k}': v for k, v in terms.items()},
                       **losses.count_foreground(outputs)}
            if 'gt_truncated' in batch:  # instances beyond max_instances in this batch
                metrics['truncated_instances'] = jnp.sum(batch['gt_truncated']).astype(
                    jnp.float32)
            return metrics

        return metrics_fn

    get_metrics_fn_jit = get_metrics_fn
