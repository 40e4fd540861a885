"""Checkpoints that defend themselves.

Each saved step gets `detectax_digest.json`: the size and sha256 of every file
orbax wrote for it, computed once the save has finalised. On resume the newest
step is checked against it, then its array shapes against the model, then
restored with a synchronous checkpointer (no background threads are left if it
fails). A damaged step is logged in one line naming the step, the file and the
error, moved to `<workdir>/checkpoints_damaged/` (never deleted, so that the
same steps can be saved again) and the previous step is tried; if none is good
the run stops with that line. A step whose arrays have other shapes than the
model's is not damage: the run stops, naming the first arrays that differ.

The input pipeline's position (`data_state/step_<N>*`) is pruned with the
checkpoints it belongs to.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from projects.maskrcnn import loop_utils

DIGEST_FILE = 'detectax_digest.json'
DAMAGED_DIR = 'checkpoints_damaged'
_ITEM = 'default'  # the CheckpointManager's name for a single item


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint holds arrays of another model."""


class NoGoodCheckpointError(RuntimeError):
    """Every checkpoint of the workdir is damaged."""


# ----------------------------------------------------------------------------
# Digests
# ----------------------------------------------------------------------------

def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Paths of the step's files, relative to `step_dir`, sorted."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != DIGEST_FILE:
                found.append(rel)
    return sorted(found)


def write_digest(step_dir: str) -> None:
    """Records {file: [size, sha256]} of a finalised step (atomically)."""
    files = {rel: [os.path.getsize(os.path.join(step_dir, rel)),
                   _sha256(os.path.join(step_dir, rel))] for rel in _files(step_dir)}
    tmp = os.path.join(step_dir, DIGEST_FILE + '.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump({'format': 1, 'files': files}, f, indent=0)
    os.replace(tmp, os.path.join(step_dir, DIGEST_FILE))


def verify_step(step_dir: str) -> str | None:
    """The first problem of a step directory ('<file>: <what>'), or None.

    A step without a digest (saved by an older version, or interrupted between
    orbax's commit and the digest) can only be checked by restoring it.
    """
    if not os.path.isdir(step_dir):
        return f'{step_dir}: not a directory'
    if not _files(step_dir):
        return f'{step_dir}: the step directory is empty'
    digest_path = os.path.join(step_dir, DIGEST_FILE)
    if not os.path.exists(digest_path):
        return None
    try:
        with open(digest_path, encoding='utf-8') as f:
            files = json.load(f)['files']
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f'{digest_path}: unreadable digest ({e})'
    for rel, (size, sha) in sorted(files.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.exists(path):
            return f'{path}: file missing'
        actual = os.path.getsize(path)
        if actual != size:
            return f'{path}: {actual} bytes, {size} when saved (truncated or overwritten)'
        if _sha256(path) != sha:
            return f'{path}: contents differ from those saved (sha256 mismatch)'
    return None


def has_digest(step_dir: str) -> bool:
    return os.path.exists(os.path.join(step_dir, DIGEST_FILE))


# ----------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------

def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {'/'.join(str(k) for k in key): tuple(getattr(v, 'shape', np.shape(v)))
            for key, v in ocp.tree.to_flat_dict(tree).items()}


def shape_differences(saved: Any, model: Any, limit: int = 5) -> list[str]:
    """Arrays whose shape differs, or that exist on one side only; parameters
    first. Each entry names the array and both shapes."""
    saved, model = _flat_shapes(saved), _flat_shapes(model)
    diffs = []
    for name in sorted(set(saved) | set(model), key=lambda n: (not n.startswith('params/'), n)):
        if saved.get(name) != model.get(name):
            there = saved.get(name, 'absent')
            here = model.get(name, 'absent')
            diffs.append(f'{name} is {there} in the checkpoint and {here} in this model')
    return diffs[:limit] + ([f'... {len(diffs) - limit} more'] if len(diffs) > limit else [])


# ----------------------------------------------------------------------------
# Data-pipeline state
# ----------------------------------------------------------------------------

def data_state_path(workdir: str, step: int) -> str:
    """Each process saves its own input-pipeline position."""
    suffix = f'_process_{jax.process_index()}' if jax.process_count() > 1 else ''
    return os.path.join(workdir, 'data_state', f'step_{step}{suffix}')


def prune_data_state(workdir: str, kept_steps) -> list[str]:
    """Deletes this process's data_state files of steps not in `kept_steps`."""
    directory = os.path.join(workdir, 'data_state')
    if not os.path.isdir(directory):
        return []
    suffix = f'_process_{jax.process_index()}' if jax.process_count() > 1 else ''
    pattern = re.compile(rf'step_(\d+){re.escape(suffix)}\.(index|data-.*)')
    kept = {int(s) for s in kept_steps}
    removed = []
    for name in sorted(os.listdir(directory)):
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) not in kept:
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


# ----------------------------------------------------------------------------
# Save and restore
# ----------------------------------------------------------------------------

def step_dir(directory: str, step: int) -> str:
    return os.path.join(str(directory), str(step))


def save(manager: ocp.CheckpointManager, state: Any, train_iter, workdir: str) -> None:
    """Saves `state` (and the input position) for its step, then the digest,
    then prunes the input positions of the steps orbax dropped."""
    step = int(jax.device_get(state.step))
    if manager.latest_step() == step:
        return
    if hasattr(train_iter, 'save'):
        os.makedirs(os.path.join(workdir, 'data_state'), exist_ok=True)
        train_iter.save(data_state_path(workdir, step))
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    loop_utils.barrier(f'detectax_saved_{step}')
    if jax.process_index() == 0:
        write_digest(step_dir(manager.directory, step))
    prune_data_state(workdir, manager.all_steps())
    logging.info('Saved checkpoint for step %d in %s', step, manager.directory)


_open_managers: list[ocp.CheckpointManager] = []


def open_manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
    """The run's CheckpointManager, closed by `closing_managers` whatever happens."""
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True))
    _open_managers.append(manager)
    return manager


@contextlib.contextmanager
def closing_managers():
    """Finishes and closes the managers opened inside, on errors too: orbax's
    background threads then end before the interpreter does, instead of
    burying the error under "Event loop is closed" ones."""
    first = len(_open_managers)
    try:
        yield
    finally:
        while len(_open_managers) > first:
            manager = _open_managers.pop()
            manager.wait_until_finished()
            manager.close()


def step_numbers(directory: str) -> list[int]:
    """The step numbers of the step directories in `directory`, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _short_error(error: Exception) -> str:
    """An orbax/tensorstore error in one line, from the innermost exception of
    its chain that names a file (tensorstore names the file and the array)."""
    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in reversed(chain):
        text = str(e).split(' [tensorstore_spec')[0].strip()
        files = re.findall(r'local file "([^"]+)"', text)
        if files:
            return f'{files[-1]}: {type(e).__name__}: {text.splitlines()[0][:400]}'
    first = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {first[:400]}'


def _restore_step(path: str, abstract: Any, workdir: str, step: int, train_iter) -> Any:
    """Restores one step with a synchronous checkpointer, closed whatever happens.

    Raises:
      CheckpointMismatchError: the step holds arrays of other shapes.
      Exception: anything else that makes the step unusable.
    """
    checkpointer = ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(**{_ITEM: ocp.StandardCheckpointHandler()}))
    try:
        metadata = checkpointer.metadata(path).item_metadata[_ITEM]
        if metadata is None:
            raise ValueError(f'{path}/{_ITEM}: no readable array metadata')
        diffs = shape_differences(metadata, abstract)
        if diffs:
            raise CheckpointMismatchError(
                f'The checkpoint of step {step} in {path} does not fit this model: '
                f'{"; ".join(diffs)}. This workdir was trained with another config: use '
                f'a new --workdir, or the config it was trained with.')
        restored = checkpointer.restore(
            path, args=ocp.args.Composite(**{_ITEM: ocp.args.StandardRestore(abstract)}))
    finally:
        checkpointer.close()
    data_path = data_state_path(workdir, step)
    if hasattr(train_iter, 'restore') and os.path.exists(data_path + '.index'):
        try:
            train_iter.restore(data_path)
        except Exception as e:  # TensorFlow raises many kinds
            raise ValueError(f'{data_path} (.index, .data-*): unreadable input-pipeline state '
                             f'({type(e).__name__}: {str(e).splitlines()[0][:300]})') from e
    elif hasattr(train_iter, 'restore'):
        logging.warning('No data-iterator state for step %d: the data stream restarts.', step)
    return restored[_ITEM]


def _move_aside(workdir: str, directory: str, step: int) -> str:
    """Moves a damaged step out of orbax's sight (never deletes it)."""
    target_root = os.path.join(workdir, DAMAGED_DIR)
    os.makedirs(target_root, exist_ok=True)
    target, n = os.path.join(target_root, str(step)), 1
    while os.path.exists(target):
        target, n = os.path.join(target_root, f'{step}.{n}'), n + 1
    shutil.move(step_dir(directory, step), target)
    return target


def _try_steps(directory: str, steps: list[int], abstract: Any, workdir: str, train_iter
               ) -> tuple[int | None, Any, list[tuple[int, str]]]:
    """Newest first: the first step that verifies and restores, its state, and
    the (step, problem) of each newer one that did not."""
    damaged = []
    for step in reversed(steps):
        path = step_dir(directory, step)
        problem = verify_step(path)
        if problem is None:
            if not has_digest(path):
                logging.info('Checkpoint step %d has no %s (saved by an older version or '
                             'interrupted before it was written): restoring it unverified.',
                             step, DIGEST_FILE)
            try:
                return step, _restore_step(path, abstract, workdir, step, train_iter), damaged
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001  (any failure makes the step unusable)
                problem = _short_error(e)
        damaged.append((step, problem))
        logging.warning('Checkpoint step %d is damaged: %s. Trying the previous step.',
                        step, problem)
    return None, None, damaged


def restore_latest_good(directory: str, state: Any, train_iter, workdir: str) -> Any:
    """Restores the newest good step of `directory` into `state`'s structure and
    shardings; returns `state` itself when there is no checkpoint.

    Call before creating the CheckpointManager: damaged steps are moved aside.

    Raises:
      NoGoodCheckpointError: checkpoints exist and none is usable.
      CheckpointMismatchError: the newest intact step holds another model.
    """
    steps = step_numbers(directory)
    if not steps:
        return state
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    step, restored, damaged = _try_steps(directory, steps, abstract, workdir, train_iter)
    if jax.process_count() > 1:
        # Every process must resume from the same step (input states are per process).
        mine = -1 if step is None else step
        agreed = int(np.min(multihost_utils.process_allgather(np.int64(mine))))
        if agreed != mine:
            step = None if agreed < 0 else agreed
            restored = None if step is None else _restore_step(
                step_dir(directory, step), abstract, workdir, step, train_iter)
        loop_utils.barrier('detectax_verified')
    if step is not None and jax.process_index() == 0:
        for bad in (s for s in steps if s > step):
            logging.info('Damaged checkpoint step %d moved to %s', bad,
                         _move_aside(workdir, directory, bad))
    loop_utils.barrier('detectax_moved_aside')
    if step is None:
        raise NoGoodCheckpointError(
            f'No usable checkpoint in {directory}: ' +
            '; '.join(f'step {s}: {p}' for s, p in damaged) +
            '. Nothing was moved or deleted; use a new --workdir to start over.')
    prune_data_state(workdir, [s for s in steps if s <= step])
    logging.info('Resumed from checkpoint at step %d', step)
    return restored
