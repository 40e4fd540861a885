"""Trains and evaluates Mask R-CNN.

  python projects/maskrcnn/main.py --config=configs/demo_shapes.py --workdir=/tmp/detectax_demo

Runs through Scenic's `scenic.app` when Scenic is installed, else through the
in-project runtime with the same contract.
"""

from absl import logging
from clu import metric_writers
import jax
import ml_collections

from projects.maskrcnn import trainer
from projects.maskrcnn.data import dataset as dataset_lib
from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.scenic_compat import SCENIC_AVAILABLE, runtime_name

if SCENIC_AVAILABLE:
    from scenic import app  # pylint: disable=g-import-not-at-top
    from scenic.train_lib import train_utils  # pylint: disable=g-import-not-at-top
else:
    from projects.maskrcnn import runtime as app  # pylint: disable=g-import-not-at-top


def get_dataset(config: ml_collections.ConfigDict, data_rng: jax.Array):
    """The dataset through Scenic's registry when present, else the project's."""
    if SCENIC_AVAILABLE:
        return train_utils.get_dataset(config, data_rng)
    return dataset_lib.get_dataset_from_config(config, data_rng)


def main(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str,
         writer: metric_writers.MetricWriter) -> None:
    logging.info('Detectax runtime: %s', runtime_name())
    data_rng, rng = jax.random.split(rng)
    dataset = get_dataset(config, data_rng)
    trainer.train_and_evaluate(rng=rng, config=config, model_cls=MaskRCNNModel,
                               dataset=dataset, workdir=workdir, writer=writer)


if __name__ == '__main__':
    app.run(main=main)
