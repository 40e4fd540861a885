"""Optimizer and learning-rate schedule of the Detectron2 recipes, with optax.

SGD with momentum (`optimizer='momentum'`, the default): weight decay added to the
gradient, as PyTorch's SGD. AdamW (`optimizer='adamw'`, as Detectron2's ViTDet recipes):
decoupled weight decay. Either way weight decay is skipped for norm parameters (or
for the paths `no_weight_decay` names), frozen backbone stages get no update at all,
updates are scaled per layer where `layerwise_decay` is set (optim_rules.py), and the
learning rate warms up linearly from `warmup_factor`, then decays in steps.
"""

from typing import Any

import flax
import ml_collections
import optax

from projects.maskrcnn import optim_rules
from projects.maskrcnn.modeling import registry

OPTIMIZERS = ('momentum', 'adamw')


def learning_rate_schedule(lr_configs: ml_collections.ConfigDict) -> optax.Schedule:
    """lr(step) = base * warmup(step) * decay_factor ** (#decay_steps <= step)."""
    base = lr_configs.base_learning_rate
    warmup_steps = lr_configs.get('warmup_steps', 0)
    warmup_factor = lr_configs.get('warmup_factor', 0.001)
    boundaries = {int(s): lr_configs.get('decay_factor', 0.1)
                  for s in lr_configs.get('decay_steps', ())}
    decay = optax.piecewise_constant_schedule(base, boundaries)
    if not warmup_steps:
        return decay

    def schedule(step):
        alpha = optax.linear_schedule(warmup_factor, 1.0, warmup_steps)(step)
        return alpha * decay(step)

    return schedule


def parameter_labels(params: Any, frozen: tuple[str, ...], no_weight_decay=None) -> Any:
    """'frozen' (backbone parameters whose names start with one of `frozen`),
    'no_decay' (norm parameters, or the paths matching the `no_weight_decay`
    patterns, see optim_rules.py) or 'decay' for every parameter."""
    frozen = tuple(frozen)
    no_decay = optim_rules.no_decay_rule(no_weight_decay)
    flat = flax.traverse_util.flatten_dict(params)
    labels = {}
    for path in flat:
        if path[0] == 'body' and frozen and path[1].startswith(frozen):
            labels[path] = 'frozen'
        elif no_decay(path):
            labels[path] = 'no_decay'
        else:
            labels[path] = 'decay'
    return flax.traverse_util.unflatten_dict(labels)


def build_optimizer(config: ml_collections.ConfigDict, params: Any
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for `params` and its learning-rate schedule."""
    opt = config.optimizer_configs
    schedule = learning_rate_schedule(config.lr_configs)

    name = opt.get('optimizer', 'momentum')
    if name not in OPTIMIZERS:
        raise ValueError(f'config.optimizer_configs.optimizer={name!r} is not one of {OPTIMIZERS}')

    def transform(weight_decay):
        steps = []
        if opt.get('grad_clip_norm'):
            steps.append(optax.clip_by_global_norm(opt.grad_clip_norm))
        if name == 'adamw':
            steps.append(optax.adamw(schedule, b1=opt.get('beta1', 0.9), b2=opt.get('beta2', 0.999),
                                     eps=opt.get('eps', 1e-8), weight_decay=weight_decay))
        else:
            if weight_decay:
                steps.append(optax.add_decayed_weights(weight_decay))
            steps.append(optax.sgd(schedule, momentum=opt.momentum,
                                   nesterov=opt.get('nesterov', False)))
        return optax.chain(*steps)

    group = config.model.get('backbone')
    backbone = registry.spec_from_config('backbone', group.to_dict() if group else {})
    tx = optax.multi_transform(
        {'decay': transform(opt.weight_decay),
         'no_decay': transform(opt.get('weight_decay_norm', 0.0)),
         'frozen': optax.set_to_zero()},
        parameter_labels(params, registry.frozen_prefixes(backbone), opt.get('no_weight_decay')))
    if opt.get('layerwise_decay'):
        scales = optim_rules.layerwise_lr_scales(params, opt.layerwise_decay,
                                                 opt.get('layerwise_num_layers'))
        tx = optax.chain(tx, optim_rules.scale_by_tree(scales))
    return tx, schedule
