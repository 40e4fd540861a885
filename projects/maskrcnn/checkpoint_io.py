"""Finds and reads "a checkpoint": what predict, export and `init_from` accept.

Four kinds of directory are a checkpoint:

  workdir      a training workdir, holding checkpoints/<step>/default
  checkpoints  its checkpoints/ folder                   (the latest step is read)
  step         one step directory, holding default/
  converted    an orbax checkpoint written by tools/convert_checkpoint.py (or any
               orbax directory holding {'params', 'model_state'})

Each holds a tree with `params` and `model_state` (the trainer's TrainState has
more fields, e.g. the optimizer's; they are never read here). The
`categories.json` that names the classes sits in the workdir (the first three
kinds) or in the converted directory itself.
"""

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from projects.maskrcnn import checkpointing

CATEGORIES_FILENAME = 'categories.json'
ITEM_NAME = 'default'  # the CheckpointManager's item directory inside a step
# Orbax writes this file last into every finished checkpoint directory.
_ORBAX_MARKER = '_METADATA'
KINDS = (
    'a training workdir (holding checkpoints/<step>/default)',
    'its checkpoints/ folder',
    'one step directory (holding default/)',
    'a converted checkpoint directory (tools/convert_checkpoint.py output)',
)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A located checkpoint.

    Attributes:
      path: the directory as given.
      kind: 'workdir', 'checkpoints', 'step' or 'converted'.
      item_dir: the orbax directory whose tree is read.
      categories_file: the categories.json that belongs to it ('' if there is none).
    """
    path: str
    kind: str
    item_dir: str
    categories_file: str


def _is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _ORBAX_MARKER))


def _latest_step_dir(checkpoints_dir: str) -> str | None:
    """The finished step directory with the highest step number, or None."""
    # Orbax writes a step under a temporary name and renames it when finished.
    steps = [n for n in checkpointing.step_numbers(checkpoints_dir)
             if _is_orbax_dir(os.path.join(checkpoints_dir, str(n), ITEM_NAME))]
    return os.path.join(checkpoints_dir, str(max(steps))) if steps else None


def _describe(path: str) -> str:
    """What a directory holds, for the error message."""
    if not os.path.exists(path):
        return 'nothing (it does not exist)'
    if not os.path.isdir(path):
        return 'a file, not a directory'
    names = sorted(os.listdir(path))
    if not names:
        return 'an empty directory'
    shown = ', '.join(names[:12]) + (f', ... ({len(names)} entries)' if len(names) > 12 else '')
    return f'a directory holding {shown}'


def locate(path: str) -> Checkpoint:
    """Which of the four kinds `path` is, and where its tree and categories are.

    Raises:
      FileNotFoundError: naming `path`, what it holds and the four kinds expected.
    """
    full = os.path.abspath(os.path.expanduser(path))

    def categories(directory):
        candidate = os.path.join(directory, CATEGORIES_FILENAME)
        return candidate if os.path.isfile(candidate) else ''

    if os.path.isdir(full):
        if _is_orbax_dir(os.path.join(full, ITEM_NAME)):  # one step
            return Checkpoint(path, 'step', os.path.join(full, ITEM_NAME),
                              categories(os.path.dirname(os.path.dirname(full))))
        if _is_orbax_dir(full):
            return Checkpoint(path, 'converted', full, categories(full))
        for kind, checkpoints_dir, workdir in (
                ('workdir', os.path.join(full, 'checkpoints'), full),
                ('checkpoints', full, os.path.dirname(full))):
            step_dir = (_latest_step_dir(checkpoints_dir) if os.path.isdir(checkpoints_dir)
                        else None)
            if step_dir:
                return Checkpoint(path, kind, os.path.join(step_dir, ITEM_NAME),
                                  categories(workdir))
    raise FileNotFoundError(
        f'{path} is not a checkpoint: found {_describe(full)}. Expected one of: '
        + '; '.join(KINDS) + '.')


def tree_metadata(checkpoint: Checkpoint) -> dict[str, Any]:
    """The saved tree's array metadata (shapes, dtypes) under `params` and
    `model_state`; reads no arrays."""
    tree = ocp.PyTreeCheckpointer().metadata(checkpoint.item_dir).item_metadata.tree
    if 'params' not in tree:
        raise ValueError(f'{checkpoint.item_dir} holds no "params" (it holds '
                         f'{sorted(tree)}): not a Detectax checkpoint')
    return {'params': tree['params'], 'model_state': tree.get('model_state') or {}}


def restore(checkpoint: Checkpoint) -> dict[str, Any]:
    """{'params': ..., 'model_state': {...}} as numpy arrays; nothing else is read.

    A training step whose files differ from the digest saved with them is refused
    (checkpointing.py), naming the file.
    """
    step_dir = os.path.dirname(checkpoint.item_dir)
    problem = checkpointing.verify_step(step_dir)
    if problem:
        raise ValueError(f'The checkpoint {step_dir} is damaged: {problem}. Pass an earlier '
                         'step directory, or rerun training on the workdir (it resumes from '
                         'the last good step).')
    item = tree_metadata(checkpoint)
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = ocp.PyTreeCheckpointer().restore(checkpoint.item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    return {'params': restored['params'], 'model_state': restored.get('model_state') or {}}


def num_classes(checkpoint: Checkpoint) -> int | None:
    """K of the saved box classifier (its outputs minus background), None without one."""
    params = tree_metadata(checkpoint)['params']
    try:
        kernel = params['box_predictor']['cls_score']['kernel']
    except (KeyError, TypeError):
        return None
    return int(kernel.shape[-1]) - 1
