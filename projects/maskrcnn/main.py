"""Trains and evaluates Mask R-CNN.

  python projects/maskrcnn/main.py --config=configs/demo_shapes.py --workdir=/tmp/detectax_demo

Runs through Scenic's `scenic.app` when Scenic is installed, else through the
in-project runtime with the same contract.

Several processes (hosts) join one run through `jax.distributed` when launched
with JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID in
the environment, or with DETECTAX_DISTRIBUTED=1 where JAX detects the cluster
itself (Cloud TPU pod slices, SLURM, Open MPI). See BUILD_NOTES.md.
"""

import os
import sys

from projects.maskrcnn import workdir_lock

if __name__ == '__main__':
    # Before TensorFlow and JAX load (seconds): a run on a busy workdir stops at once.
    workdir_lock.exit_if_busy(sys.argv)

from absl import logging
from clu import metric_writers
import jax
import ml_collections

from projects.maskrcnn import trainer
from projects.maskrcnn.data import dataset as dataset_lib
from projects.maskrcnn.kernels import host_memory
from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.scenic_compat import SCENIC_AVAILABLE, runtime_name

if SCENIC_AVAILABLE:
    from scenic import app  # pylint: disable=g-import-not-at-top
    from scenic.train_lib import train_utils  # pylint: disable=g-import-not-at-top
else:
    from projects.maskrcnn import runtime as app  # pylint: disable=g-import-not-at-top


# What host_memory.keep_freed_memory() did when this file is run as the program.
_HOST_MEMORY = 'allocator defaults (main.py imported, not run)'


def get_dataset(config: ml_collections.ConfigDict, data_rng: jax.Array):
    """The dataset through Scenic's registry when present, else the project's."""
    if SCENIC_AVAILABLE:
        return train_utils.get_dataset(config, data_rng)
    return dataset_lib.get_dataset_from_config(config, data_rng)


def initialize_distributed() -> None:
    """Joins a multi-process run described by the environment (see the module doc)."""
    if os.environ.get('JAX_COORDINATOR_ADDRESS'):
        missing = [k for k in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID') if k not in os.environ]
        if missing:
            raise ValueError(f'JAX_COORDINATOR_ADDRESS is set but {", ".join(missing)} is not')
        jax.distributed.initialize(num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                                   process_id=int(os.environ['JAX_PROCESS_ID']))
    elif os.environ.get('DETECTAX_DISTRIBUTED', '0') not in ('', '0'):
        jax.distributed.initialize()


def main(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str,
         writer: metric_writers.MetricWriter) -> None:
    logging.info('Detectax runtime: %s; host memory: %s', runtime_name(), _HOST_MEMORY)
    with workdir_lock.hold(workdir):  # before the dataset: a second run stops at once
        data_rng, rng = jax.random.split(rng)
        dataset = get_dataset(config, data_rng)
        trainer.train_and_evaluate(rng=rng, config=config, model_cls=MaskRCNNModel,
                                   dataset=dataset, workdir=workdir, writer=writer)


if __name__ == '__main__':
    # Before JAX starts its backend: keeps the step's freed host buffers (kernels/host_memory.py).
    _HOST_MEMORY = host_memory.keep_freed_memory()
    initialize_distributed()
    app.run(main=main)
