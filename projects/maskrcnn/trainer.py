"""Training and evaluation loop: Scenic's trainer signature, built on jax.jit
over a device mesh, optax, orbax and clu, so it runs with or without Scenic."""

import functools
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers, periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from projects.maskrcnn import config_check, evaluation, optim

GT_KEYS = ('gt_boxes', 'gt_classes', 'gt_valid', 'gt_masks')


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    opt_state: Any
    model_state: Any  # every non-param collection: batch_stats, frozen
    rng: jnp.ndarray


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
            'gt_masks': jnp.zeros((batch_size, m, s, s))}


def init_variables(model, rng: jax.Array, meta: dict) -> dict:
    """Initialises the detector's variables (all collections) on a 1-image batch."""
    batch = _dummy_batch(meta, 1)
    init = functools.partial(model.flax_model.init, train=True)
    params_rng, sampling_rng = jax.random.split(rng)
    return jax.jit(init)({'params': params_rng, 'sampling': sampling_rng}, batch['image'],
                         batch['image_size'], {k: batch[k] for k in GT_KEYS})


def train_step(state: TrainState, batch: dict, *, model, tx) -> tuple[TrainState, dict]:
    step_rng, next_rng = jax.random.split(state.rng)
    sampling_rng = jax.random.fold_in(step_rng, state.step)

    def loss_fn(params):
        variables = {'params': params, **state.model_state}
        mutable = [k for k in state.model_state if k == 'batch_stats']
        outputs, new_state = model.flax_model.apply(
            variables, batch['image'], batch['image_size'], {k: batch[k] for k in GT_KEYS},
            train=True, rngs={'sampling': sampling_rng}, mutable=mutable)
        loss = model.loss_function(outputs, batch)
        return loss, (outputs, new_state)

    (loss, (outputs, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    metrics = model.get_metrics_fn('train')(outputs, batch)
    metrics['grad_norm'] = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree_util.tree_leaves(grads)))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state={**state.model_state, **new_model_state},
                              rng=next_rng)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model) -> dict:
    variables = {'params': state.params, **state.model_state}
    return model.flax_model.apply(variables, batch['image'], batch['image_size'], train=False)


# ----------------------------------------------------------------------------
# Checkpoints: orbax for the state, clu's iterator checkpoint for the data
# ----------------------------------------------------------------------------

def _data_state_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, 'data_state', f'step_{step}')


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, train_iter,
                    workdir: str) -> None:
    step = int(jax.device_get(state.step))
    if manager.latest_step() == step:
        return
    if hasattr(train_iter, 'save') and jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, 'data_state'), exist_ok=True)
        train_iter.save(_data_state_path(workdir, step))
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    logging.info('Saved checkpoint for step %d in %s', step, manager.directory)


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState, train_iter,
                       workdir: str) -> TrainState:
    step = manager.latest_step()
    if step is None:
        return state
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    data_path = _data_state_path(workdir, step)
    if hasattr(train_iter, 'restore') and os.path.exists(data_path + '.index'):
        train_iter.restore(data_path)
    else:
        logging.warning('No data-iterator state for step %d: the data stream restarts.', step)
    logging.info('Resumed from checkpoint at step %d', step)
    return state


def load_init_checkpoint(path: str, params: Any, model_state: Any) -> tuple[Any, Any]:
    """Initialises from another run's (or a converted) checkpoint: every array
    whose name and shape match is taken; the others keep their initial value."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'config.init_from.checkpoint_path={path} does not exist')
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    source = flax.traverse_util.flatten_dict(
        {'params': restored.get('params', {}), **restored.get('model_state', {})})
    target = flax.traverse_util.flatten_dict({'params': params, **model_state})
    loaded, skipped = 0, []
    for key, value in target.items():
        if key in source and np.shape(source[key]) == np.shape(value):
            target[key] = jnp.asarray(source[key], value.dtype)
            loaded += 1
        else:
            skipped.append('/'.join(key))
    logging.info('init_from %s: loaded %d arrays, kept %d at init: %s', path, loaded,
                 len(skipped), ', '.join(skipped[:20]))
    merged = flax.traverse_util.unflatten_dict(target)
    return merged.pop('params'), merged


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

def evaluate(state: TrainState, eval_fn, dataset, config, workdir: str, put) -> dict:
    meta = dataset.meta_data
    evaluator = evaluation.CocoEvaluator(meta['val_annotations_file'], meta['category_ids'],
                                         output_dir=workdir)
    seen = 0
    max_examples = config.get('eval_max_examples')
    for batch in dataset.valid_iter():
        predictions = jax.device_get(eval_fn(state, put({k: batch[k] for k in ('image', 'image_size')})))
        evaluator.add_batch(predictions, batch)
        seen += int(batch['batch_mask'].sum())
        if max_examples and seen >= max_examples:
            break
    return evaluator.compute_metrics()


def data_parallel_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process, partitioned by the compiler."""
    auto = getattr(jax.sharding, 'AxisType', None)
    if auto is None:  # older jax: every mesh axis is automatic
        return jax.make_mesh((jax.device_count(),), ('data',))
    return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(auto.Auto,))


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

def train_and_evaluate(*, rng: jax.Array, config: ml_collections.ConfigDict, model_cls,
                       dataset, workdir: str, writer: metric_writers.MetricWriter
                       ) -> tuple[TrainState, dict]:
    """Trains `model_cls` on `dataset`, evaluating and checkpointing in `workdir`.

    Returns the final state and the last evaluation metrics.
    """
    config_check.check_config(config, jax.device_count())
    model = model_cls(config, dataset.meta_data)
    mesh = data_parallel_mesh()
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P('data'))

    def put(batch):
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(data_sharding, np.asarray(x)), batch)

    # --- state ---
    init_rng, state_rng = jax.random.split(rng)
    variables = init_variables(model, init_rng, dataset.meta_data)
    params = variables.pop('params')
    model_state = dict(variables)
    if config.get('init_from') and config.init_from.get('checkpoint_path'):
        params, model_state = load_init_checkpoint(config.init_from.checkpoint_path,
                                                   params, model_state)
    tx, schedule = optim.build_optimizer(config, params)
    state = TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                       opt_state=tx.init(params), model_state=model_state, rng=state_rng)
    state = jax.device_put(state, replicated)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info('Model has %.2fM parameters', num_params / 1e6)

    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.get('max_checkpoints_to_keep', 3), create=True))
    state = restore_checkpoint(manager, state, dataset.train_iter, workdir)
    start_step = int(jax.device_get(state.step))

    train_fn = jax.jit(functools.partial(train_step, model=model, tx=tx),
                       in_shardings=(replicated, data_sharding),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step, model=model),
                      in_shardings=(replicated, data_sharding))

    if start_step == 0:
        writer.write_texts(0, {'config': f'```\n{config}\n```'})
    total_steps = config.num_training_steps
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_summary_steps)
    eval_every = config.get('log_eval_steps') or total_steps
    history, last_log, eval_metrics = [], time.time(), {}
    logging.info('Training from step %d to %d', start_step, total_steps)
    for step in range(start_step + 1, total_steps + 1):
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
            batch = put(next(dataset.train_iter))
            state, metrics = train_fn(state, batch)
        history.append(metrics)
        report(step)
        if step % config.log_summary_steps == 0 or step == total_steps:
            summary = jax.tree_util.tree_map(lambda *x: float(np.mean(x)),
                                             *jax.device_get(history))
            elapsed = time.time() - last_log
            summary['images_per_sec'] = len(history) * config.batch_size / elapsed
            summary['learning_rate'] = float(schedule(step - 1))
            if not np.isfinite(summary['total_loss']):
                raise FloatingPointError(f'non-finite loss at step {step}: {summary}')
            writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
            logging.info('step %d: %s', step, ', '.join(f'{k}={v:.4g}' for k, v in summary.items()))
            history, last_log = [], time.time()
        if step % config.checkpoint_steps == 0 or step == total_steps:
            save_checkpoint(manager, state, dataset.train_iter, workdir)
        if step % eval_every == 0 or step == total_steps:
            with report.timed('eval'):
                eval_metrics = evaluate(state, eval_fn, dataset, config, workdir, put)
            writer.write_scalars(step, {f'valid/{k}': v for k, v in eval_metrics.items()})
            logging.info('eval at step %d: %s', step,
                         ', '.join(f'{k}={v:.2f}' for k, v in eval_metrics.items()))
            last_log = time.time()
        writer.flush()
    if start_step >= total_steps:
        logging.info('Already trained for %d steps; evaluating the final checkpoint.', start_step)
        eval_metrics = evaluate(state, eval_fn, dataset, config, workdir, put)
        writer.write_scalars(start_step, {f'valid/{k}': v for k, v in eval_metrics.items()})
    manager.close()
    writer.flush()
    return state, eval_metrics
