"""Serialises the inference function with `jax.export` for serving without the model code.

  python -m projects.maskrcnn.export --config=configs/demo_shapes.py \
      --checkpoint=/tmp/detectax_demo --output=/tmp/detectax_exported \
      [--batch_size=8 --height=128 --width=128] [--platforms=cpu,cuda]

The exported function takes (weights, images float32 [B, H, W, 3] normalised and
zero-padded, image_sizes int32 [B, 2] (height, width) before padding) and returns
the detector's evaluation outputs (`detection_boxes` [B, D, 4] xyxy in resized
pixels, `detection_scores`, `detection_classes`, `detection_valid`,
`detection_masks` [B, D, 28, 28]). B, H and W are fixed at export time (defaults:
the config's eval_batch_size and dataset_configs.image_size).

The output directory holds `model.jax` (the serialised program, without weights),
`params.npz` (the weights, one array per leaf in flattening order) and
`metadata.json` (sizes, normalisation, resize rule, class names, thresholds).
`serving_loader.ServingModel` runs it with only jax and numpy installed.
"""

import json
import os
import sys
from typing import Any
from collections.abc import Sequence

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from projects.maskrcnn import predict, serving_loader
from projects.maskrcnn.kernels import onednn

FORMAT_VERSION = 1


def preprocessing_metadata(settings: dict[str, Any]) -> dict[str, Any]:
    """What `serving_loader.preprocess` needs of the dataset settings: normalisation,
    sizes and the weights' resize rule."""
    return {
        'pixel_mean': [float(v) for v in settings['pixel_mean']],
        'pixel_std': [float(v) for v in settings['pixel_std']],
        'channel_order': settings.get('channel_order', 'RGB'),
        'eval_min_size': float(settings['eval_min_size']),
        'max_size': float(settings['max_size']),
        'resize_rounding': settings['resize_rounding'],
    }


def _serving_function(model, treedef):
    def serve(flat_params, images, image_sizes):
        variables = jax.tree_util.tree_unflatten(treedef, flat_params)
        return model.flax_model.apply(variables, images, image_sizes, train=False)
    return serve


def export_model(config: ml_collections.ConfigDict, checkpoint: str, output_dir: str, *,
                 batch_size: int | None = None, height: int | None = None,
                 width: int | None = None, platforms: Sequence[str] | None = None,
                 categories_file: str | None = None, score_threshold: float = 0.5
                 ) -> dict[str, Any]:
    """Exports the latest checkpoint under `checkpoint`; returns the metadata written.

    Args:
      config: the training config.
      checkpoint: training workdir, its checkpoints/ directory, a step directory or a
        converted checkpoint directory (see `checkpoint_io.locate`).
      output_dir: where model.jax, params.npz and metadata.json go.
      batch_size, height, width: the fixed input shape; default eval_batch_size and
        the config's padded image size. H and W must be multiples of the largest
        FPN stride.
      platforms: e.g. ('cpu', 'cuda'); default the platform JAX runs on here.
      categories_file: see `predict.load_categories`.
      score_threshold: written to the metadata as the suggested display threshold.
    """
    settings = predict.dataset_settings(config)
    batch_size = int(batch_size or config.eval_batch_size)
    height = int(height or settings['image_size'][0])
    width = int(width or settings['image_size'][1])
    stride = 2 ** (len(config.model.anchors.sizes) + 1)
    if height % stride or width % stride:
        raise ValueError(f'--height={height} and --width={width} must be multiples of the '
                         f'largest FPN stride {stride}')
    category_ids, category_names = predict.load_categories(checkpoint, categories_file)
    model = predict.build_model(config, len(category_ids))
    variables = predict.restore_variables(checkpoint, model, (height, width))
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    leaves = [np.asarray(x) for x in leaves]
    specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
             jax.ShapeDtypeStruct((batch_size, height, width, 3), np.float32),
             jax.ShapeDtypeStruct((batch_size, 2), np.int32))
    # XLA's own convolutions: the artifact must run without this project's
    # native kernels, and on any of `platforms`.
    with onednn.portable():
        exported = jax.export.export(jax.jit(_serving_function(model, treedef)),
                                     platforms=platforms)(*specs)

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, serving_loader.MODEL_FILENAME), 'wb') as f:
        f.write(exported.serialize())
    np.savez(os.path.join(output_dir, serving_loader.PARAMS_FILENAME),
             **{serving_loader.param_key(i): x for i, x in enumerate(leaves)})
    outputs = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
    metadata = {
        'format_version': FORMAT_VERSION,
        'batch_size': batch_size, 'height': height, 'width': width,
        'inputs': {'images': {'shape': [batch_size, height, width, 3], 'dtype': 'float32'},
                   'image_sizes': {'shape': [batch_size, 2], 'dtype': 'int32'}},
        'outputs': {k: {'shape': list(v.shape), 'dtype': str(v.dtype)}
                    for k, v in outputs.items()},
        **preprocessing_metadata(settings),
        'class_names': list(category_names),
        'category_ids': [int(i) for i in category_ids],
        'model_score_threshold': float(model.flax_model.test.score_threshold),
        'score_threshold': float(score_threshold),
        'platforms': list(exported.platforms),
        'num_params': int(sum(x.size for x in leaves)),
        'checkpoint': os.path.abspath(checkpoint),
        'jax_version': jax.__version__,
    }
    with open(os.path.join(output_dir, serving_loader.METADATA_FILENAME), 'w',
              encoding='utf-8') as f:
        json.dump(metadata, f, indent=1)
    logging.info('Exported %s for %s inputs [%d, %d, %d, 3] to %s', checkpoint,
                 '/'.join(exported.platforms), batch_size, height, width, output_dir)
    return metadata


def _define_flags() -> None:
    # Defined only when run as a program (see predict._define_flags).
    config_flags.DEFINE_config_file('config', None, 'The training config file.',
                                    lock_config=False)
    flags.DEFINE_string('checkpoint', None, 'Training workdir, its checkpoints/ directory, '
                        'one step directory (the latest step is used) or a converted '
                        'checkpoint directory.')
    flags.DEFINE_string('output', None, 'Directory for model.jax, params.npz, metadata.json.')
    flags.DEFINE_integer('batch_size', None, 'Fixed batch size; default eval_batch_size.')
    flags.DEFINE_integer('height', None, 'Fixed padded height; default the config\'s.')
    flags.DEFINE_integer('width', None, 'Fixed padded width; default the config\'s.')
    flags.DEFINE_list('platforms', None, 'Platforms to export for, e.g. cpu,cuda; '
                      'default the one JAX runs on here.')
    flags.DEFINE_string('categories', None, 'json with a COCO "categories" list; default '
                        'the checkpoint\'s categories.json.')
    flags.DEFINE_float('score_threshold', 0.5, 'Suggested display threshold (metadata).')
    flags.mark_flags_as_required(['config', 'checkpoint', 'output'])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')  # imported for the dataset settings only
    f = flags.FLAGS
    metadata = export_model(f.config, f.checkpoint, f.output, batch_size=f.batch_size,
                            height=f.height, width=f.width, platforms=f.platforms,
                            categories_file=f.categories, score_threshold=f.score_threshold)
    print(f'exported for {metadata["platforms"]}, inputs [{metadata["batch_size"]}, '
          f'{metadata["height"]}, {metadata["width"]}, 3] -> {f.output}', file=sys.stderr)


if __name__ == '__main__':
    _define_flags()
    app.run(main)
