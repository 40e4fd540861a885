"""The training state and the jitted steps: what a training loop, a benchmark or a
profiler needs to run the model, and nothing more.

Imports only JAX, Flax and the model's own packages (no TensorFlow, TFDS, clu
or pycocotools), so that benchmarks/ runs on a machine that has only JAX.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

GT_KEYS = ('gt_boxes', 'gt_classes', 'gt_valid', 'gt_masks', 'gt_has_mask')


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    opt_state: Any
    model_state: Any  # every non-param collection: batch_stats, frozen
    rng: jnp.ndarray
    # Steps whose update was skipped because the loss was not finite.
    num_skipped: jnp.ndarray = dataclasses.field(
        default_factory=lambda: jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------
# State and steps
# ----------------------------------------------------------------------------

def _dummy_batch(meta: dict, batch_size: int) -> dict:
    _, h, w, _ = meta['input_shape']
    m, s = meta['max_instances'], meta['gt_mask_size']
    return {'image': jnp.zeros((batch_size, h, w, 3)),
            'image_size': jnp.tile(jnp.asarray([h, w], jnp.int32), (batch_size, 1)),
            'gt_boxes': jnp.tile(jnp.asarray([0., 0., 16., 16.]), (batch_size, m, 1)),
            'gt_classes': jnp.ones((batch_size, m), jnp.int32),
            'gt_valid': jnp.zeros((batch_size, m), bool),
            'gt_has_mask': jnp.ones((batch_size, m), bool),
            'gt_masks': jnp.zeros((batch_size, m, s, s))}


def init_variables(model, rng: jax.Array, meta: dict) -> dict:
    """Initialises the detector's variables (all collections) on a 1-image batch."""
    batch = _dummy_batch(meta, 1)
    init = functools.partial(model.flax_model.init, train=True)
    params_rng, sampling_rng = jax.random.split(rng)
    return jax.jit(init)({'params': params_rng, 'sampling': sampling_rng}, batch['image'],
                         batch['image_size'], {k: batch[k] for k in GT_KEYS if k in batch})


def train_step(state: TrainState, batch: dict, *, model, tx,
               skip_nonfinite: bool = False) -> tuple[TrainState, dict]:
    """One SGD step. With `skip_nonfinite`, a step whose loss or gradient is not
    finite leaves parameters and optimizer state unchanged (and is counted)."""
    step_rng, next_rng = jax.random.split(state.rng)
    sampling_rng = jax.random.fold_in(step_rng, state.step)

    def loss_fn(params):
        variables = {'params': params, **state.model_state}
        mutable = [k for k in state.model_state if k == 'batch_stats']
        outputs, new_state = model.flax_model.apply(
            variables, batch['image'], batch['image_size'], {k: batch[k] for k in GT_KEYS if k in batch},
            train=True, rngs={'sampling': sampling_rng}, mutable=mutable)
        loss = model.loss_function(outputs, batch)
        return loss, (outputs, new_state)

    (loss, (outputs, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    metrics = model.get_metrics_fn('train')(outputs, batch)
    metrics['grad_norm'] = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree_util.tree_leaves(grads)))
    model_state = {**state.model_state, **new_model_state}
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    num_skipped = state.num_skipped
    if skip_nonfinite:
        keep_new = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        params = keep_new(params, state.params)
        opt_state = keep_new(opt_state, state.opt_state)
        model_state = keep_new(model_state, state.model_state)
        num_skipped = num_skipped + (~finite).astype(num_skipped.dtype)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state, rng=next_rng, num_skipped=num_skipped)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model) -> dict:
    variables = {'params': state.params, **state.model_state}
    return model.flax_model.apply(variables, batch['image'], batch['image_size'], train=False)


def validation_loss_step(state: TrainState, batch: dict, *, model) -> dict:
    """The training losses on a validation batch (fixed sampling RNG; batch-norm
    statistics, if any, are not updated)."""
    variables = {'params': state.params, **state.model_state}
    mutable = [k for k in state.model_state if k == 'batch_stats']
    outputs, _ = model.flax_model.apply(
        variables, batch['image'], batch['image_size'], {k: batch[k] for k in GT_KEYS if k in batch},
        train=True, rngs={'sampling': jax.random.PRNGKey(0)}, mutable=mutable)
    metrics = model.get_metrics_fn('validation')(outputs, batch)
    return {k: v for k, v in metrics.items() if k == 'total_loss' or k.startswith('loss_')}
