"""Training and evaluation loop: Scenic's trainer signature, built on jax.jit
over a device mesh, optax, orbax and clu, so it runs with or without Scenic."""

import functools
import json
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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from projects.maskrcnn import (checkpoint_io, checkpointing, config_check, evaluation,
                               loop_utils, optim, reporting, visualization, workdir_lock)
from projects.maskrcnn.steps import (  # noqa: F401  (the trainer's public names)
    GT_KEYS, TrainState, eval_step, init_variables, train_step, validation_loss_step)


# ----------------------------------------------------------------------------
# Checkpoints: orbax for the state, clu's iterator checkpoint for the data;
# digests, fallback and retention in checkpointing.py
# ----------------------------------------------------------------------------

def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, train_iter,
                    workdir: str) -> None:
    checkpointing.save(manager, state, train_iter, workdir)


def load_init_checkpoint(path: str, params: Any, model_state: Any) -> tuple[Any, Any]:
    """Initialises from another run's (or a converted) checkpoint, any kind that
    `checkpoint_io.locate` accepts: every array whose name and shape match is
    taken; the others keep their initial value."""
    try:
        located = checkpoint_io.locate(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'config.init_from.checkpoint_path: {e}') from None
    restored = checkpoint_io.restore(located)
    source = flax.traverse_util.flatten_dict(
        {'params': restored['params'], **restored['model_state']})
    target = flax.traverse_util.flatten_dict({'params': params, **model_state})
    loaded, other_shape, missing = 0, [], []
    for key, value in target.items():
        name = '/'.join(key)
        if key not in source:
            missing.append(name)
        elif np.shape(source[key]) != np.shape(value):
            other_shape.append(f'{name} {np.shape(source[key])} -> {np.shape(value)}')
        else:
            target[key] = jnp.asarray(source[key], value.dtype)
            loaded += 1
    if not loaded:
        raise ValueError(f'init_from {path}: no array of the checkpoint matches the model '
                         f'by name and shape')
    logging.info("init_from %s: loaded %d of the model's %d arrays", path, loaded, len(target))
    if other_shape:
        logging.warning('init_from: %d arrays have another shape in the checkpoint and keep '
                        'their initial value: %s', len(other_shape), '; '.join(other_shape))
    if missing:
        logging.info('init_from: %d arrays are not in the checkpoint and keep their initial '
                     'value: %s', len(missing), ', '.join(missing))
    merged = flax.traverse_util.unflatten_dict(target)
    return merged.pop('params'), merged


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

def _host_batch(batch: dict, keys: tuple[str, ...]) -> dict:
    """The host-side fields of this process's part of a batch, gathered from all
    processes (in process order, as the global batch is laid out)."""
    local = {k: np.asarray(batch[k]) for k in keys}
    if jax.process_count() == 1:
        return local
    return multihost_utils.process_allgather(local, tiled=True)


def evaluate(state: TrainState, eval_fn, loss_fn, dataset, config, workdir: str, put
             ) -> tuple[dict, dict]:
    """COCO box and mask AP on the validation split (overall, and per category
    as `box_AP/<name>`, `mask_AP/<name>`) and, with `loss_fn`, the
    validation losses (`total_loss`, `loss_*`: the mean over images; a padded
    image of the last batch counts as an image without objects).

    Returns the metrics and, on process 0, prediction | ground-truth images of
    the first `config.num_eval_images_to_show` validation images.
    """
    meta = dataset.meta_data
    evaluator = evaluation.CocoEvaluator(
        meta['val_annotations_file'], meta['category_ids'],
        output_dir=workdir if jax.process_index() == 0 else None)
    seen, loss_sums, loss_weight, images = 0, {}, 0.0, {}
    num_images = config.get('num_eval_images_to_show', 4) if jax.process_index() == 0 else 0
    max_examples = config.get('eval_max_examples')
    for batch in dataset.valid_iter():
        device_batch = put({k: batch[k] for k in ('image', 'image_size', *GT_KEYS) if k in batch})
        predictions = jax.device_get(eval_fn(state, device_batch))
        host = _host_batch(batch, ('image_id', 'orig_size', 'image_size', 'image_scale',
                                   'batch_mask'))
        evaluator.add_batch(predictions, host)
        if len(images) < num_images:
            # This process's examples are the first rows of the replicated predictions.
            images.update(visualization.eval_image_summaries(
                batch, predictions, meta['category_names'], pixel_mean=meta['pixel_mean'],
                pixel_std=meta['pixel_std'], channel_order=meta['channel_order'],
                max_images=num_images - len(images)))
        real = float(host['batch_mask'].sum())
        if loss_fn is not None and real:
            for k, v in jax.device_get(loss_fn(state, device_batch)).items():
                loss_sums[k] = loss_sums.get(k, 0.0) + float(v) * real
            loss_weight += real
        seen += int(real)
        if max_examples and seen >= max_examples:
            break
    metrics = evaluator.compute_metrics()
    metrics.update(reporting.per_category_metrics(evaluator.per_category, meta))
    metrics.update({k: v / loss_weight for k, v in loss_sums.items()})
    return metrics, images


def save_categories(workdir: str, meta: dict) -> None:
    """Writes workdir/categories.json (label k is entry k - 1, COCO's "categories"
    format) so that predict and export name the classes without the dataset."""
    os.makedirs(workdir, exist_ok=True)
    categories = [{'id': int(i), 'name': str(n)}
                  for i, n in zip(meta['category_ids'], meta['category_names'])]
    with open(os.path.join(workdir, 'categories.json'), 'w', encoding='utf-8') as f:
        json.dump({'categories': categories}, f, indent=1)


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
    """`_train_and_evaluate` holding the workdir (one run per workdir), with
    orbax's checkpoint managers closed however it ends."""
    with workdir_lock.hold(workdir), checkpointing.closing_managers():
        return _train_and_evaluate(rng=rng, config=config, model_cls=model_cls,
                                   dataset=dataset, workdir=workdir, writer=writer)


def _train_and_evaluate(*, rng: jax.Array, config: ml_collections.ConfigDict, model_cls,
                        dataset, workdir: str, writer: metric_writers.MetricWriter
                        ) -> tuple[TrainState, dict]:
    """Trains `model_cls` on `dataset`, evaluating and checkpointing in `workdir`.

    The same command resumes from the workdir's last checkpoint (parameters,
    optimizer, RNG and input position). SIGTERM saves a checkpoint and returns.
    With `config.eval_only`, restores the workdir's checkpoint (or `init_from`),
    evaluates once and returns.

    Returns the final state and the last evaluation metrics.
    """
    config_check.check_config(config, jax.device_count())
    model = model_cls(config, dataset.meta_data)
    if jax.process_index() == 0:
        save_categories(workdir, dataset.meta_data)
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
    loop_utils.barrier('detectax_init')
    state = jax.device_put(state, replicated)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info('Model has %.2fM parameters', num_params / 1e6)

    checkpoint_dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    state = checkpointing.restore_latest_good(checkpoint_dir, state, dataset.train_iter,
                                              workdir)
    manager = checkpointing.open_manager(checkpoint_dir,
                                         config.get('max_checkpoints_to_keep', 3))
    start_step = int(jax.device_get(state.step))

    skip_nonfinite = bool(config.get('skip_nonfinite_steps', False))
    train_fn = jax.jit(functools.partial(train_step, model=model, tx=tx,
                                         skip_nonfinite=skip_nonfinite),
                       in_shardings=(replicated, data_sharding),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))
    # Outputs replicated: every process sees every prediction (multi-process eval).
    eval_fn = jax.jit(functools.partial(eval_step, model=model),
                      in_shardings=(replicated, data_sharding), out_shardings=replicated)
    loss_fn = None
    if config.get('compute_validation_loss', True):
        loss_fn = jax.jit(functools.partial(validation_loss_step, model=model),
                          in_shardings=(replicated, data_sharding), out_shardings=replicated)

    report_run = reporting.RunReport(workdir, config, dataset.meta_data, writer)

    def run_eval(step):
        metrics, images = evaluate(state, eval_fn, loss_fn, dataset, config, workdir, put)
        writer.write_scalars(step, {f'valid/{k}': v for k, v in metrics.items()})
        if images:
            writer.write_images(step, images)
        logging.info('eval at step %d: %s', step,  # per category: report_run's table
                     ', '.join(f'{k}={v:.4g}' for k, v in metrics.items() if '/' not in k))
        report_run.evaluation(step, metrics)
        return metrics

    total_steps = config.num_training_steps
    if config.get('eval_only'):
        if start_step == 0 and not (config.get('init_from') and
                                    config.init_from.get('checkpoint_path')):
            logging.warning('eval_only without a checkpoint in %s or config.init_from: '
                            'evaluating randomly initialised parameters.', workdir)
        logging.info('eval_only: evaluating the parameters of step %d.', start_step)
        eval_metrics = run_eval(start_step)
        manager.close()
        writer.flush()
        return state, eval_metrics

    if start_step == 0:
        writer.write_texts(0, {'config': f'```\n{config}\n```'})
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_summary_steps)
    eval_every = config.get('log_eval_steps') or total_steps
    history, history_start, last_log, eval_metrics = [], start_step + 1, time.time(), {}
    logging.info('Training from step %d to %d', start_step, total_steps)
    with loop_utils.StopSignal() as stop:
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation('train', step_num=step):
                batch = put(next(dataset.train_iter))
                state, metrics = train_fn(state, batch)
            history.append(metrics)
            report(step)
            stopping = stop.should_stop(step)
            is_last = step == total_steps
            save = step % config.checkpoint_steps == 0 or is_last or stopping
            if step % config.log_summary_steps == 0 or save:
                history = jax.device_get(history)
                loop_utils.check_finite(history, history_start, manager, skip_nonfinite)
                summary = loop_utils.summarise(history)
                elapsed = time.time() - last_log
                summary['images_per_sec'] = len(history) * config.batch_size / elapsed
                summary['learning_rate'] = float(schedule(step - 1))
                if skip_nonfinite:
                    summary['skipped_steps'] = float(jax.device_get(state.num_skipped))
                writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
                report_run.train_summary(summary)
                logging.info('step %d: %s', step,
                             ', '.join(f'{k}={v:.4g}' for k, v in summary.items()))
                history, history_start, last_log = [], step + 1, time.time()
            if save:
                save_checkpoint(manager, state, dataset.train_iter, workdir)
            if stopping:
                logging.warning('Stopped by signal at step %d; the same command resumes.',
                                step)
                break
            if step % eval_every == 0 or is_last:
                with report.timed('eval'):
                    eval_metrics = run_eval(step)
                last_log = time.time()
            writer.flush()
    if start_step >= total_steps:
        logging.info('Already trained for %d steps; evaluating the final checkpoint.', start_step)
        eval_metrics = run_eval(start_step)
    manager.close()
    writer.flush()
    return state, eval_metrics
