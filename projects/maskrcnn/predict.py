"""Runs a trained Mask R-CNN on image files: COCO-format results and drawn PNGs.

  python -m projects.maskrcnn.predict --config=configs/demo_shapes.py \
      --checkpoint=/tmp/detectax_demo --input=photos/ --output=/tmp/predictions \
      [--score_threshold=0.5] [--image_sizes=800x1344,1344x1344] [--config.key=value]

Images of any size are resized as in evaluation (shortest side `eval_min_size`,
longest at most `max_size`, the size made whole by `dataset_configs.resize_rounding`:
'floor' for torchvision's weights, 'round' for Detectron2's), padded into the smallest
static size that holds them
(`--image_sizes`, default the config's `dataset_configs.image_size`; one compiled
program per size) and batched by `eval_batch_size`. The output directory gets:

  predictions.json   COCO results: image_id, file_name, category_id, category_name,
                     bbox (xywh, original pixels), score, segmentation (RLE)
  images.json        COCO "images" and "categories" (so that
                     `COCO('images.json').loadRes('predictions.json')` works) and "skipped"
  skipped.txt        one line per unreadable file: its name, a tab, the error
  visualizations/    one PNG per image with masks, boxes, class names and scores

Only detections with score >= --score_threshold are written and drawn. Images are
turned upright by their EXIF orientation first (as Detectron2's `read_image` does),
so coordinates refer to the upright image.

`--checkpoint` is any checkpoint `checkpoint_io.locate` accepts: a training
workdir, its checkpoints/ folder, one step directory, or a directory written by
tools/convert_checkpoint.py (published torchvision or Detectron2 weights).

Category ids and names come from `--categories` (a json with a COCO "categories"
list, e.g. the training set's annotations file), else from the checkpoint's
`categories.json` (written by training into its workdir, and by the converter for
COCO heads), else they are 'class 1'..'class K' with ids 1..K.
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
from PIL import Image
from pycocotools import mask as mask_utils
import tqdm

from projects.maskrcnn import checkpoint_io, evaluation, serving_loader, visualization
from projects.maskrcnn.data import coco_json, dataset as dataset_lib, image_io
from projects.maskrcnn.model import MaskRCNNModel

CATEGORIES_FILENAME = checkpoint_io.CATEGORIES_FILENAME
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff',
                    '.ppm', '.pgm')


# ----------------------------------------------------------------------------
# Settings, categories and parameters
# ----------------------------------------------------------------------------

def dataset_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's dataset_configs merged over the dataset's defaults (validated)."""
    read = dataset_lib._read_configs  # pylint: disable=protected-access
    return read(config.dataset_name, config.get('dataset_configs'))


def read_categories(path: str) -> tuple[list[int], list[str]]:
    """(ids, names) in label order from a json with a COCO "categories" list."""
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    categories = data['categories']
    # The builder's labels: sorted ids, without an unused background-named category.
    used = ({a['category_id'] for a in data['annotations']} if data.get('annotations')
            else {c['id'] for c in categories})
    categories = sorted(coco_json.label_categories(categories, used),
                        key=lambda c: int(c['id']))
    return [int(c['id']) for c in categories], [str(c['name']) for c in categories]


def write_categories(directory: str, category_ids: Sequence[int],
                     category_names: Sequence[str]) -> str:
    """Writes `categories.json` (the format `read_categories` reads); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CATEGORIES_FILENAME)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump({'categories': [{'id': int(i), 'name': str(n)}
                                  for i, n in zip(category_ids, category_names)]}, f, indent=1)
    return path


def load_categories(checkpoint: str, categories_file: str | None = None
                    ) -> tuple[list[int], list[str]]:
    """Category ids and names in label order: from `categories_file`, else from the
    checkpoint's categories.json (its training workdir's, or the one the converter
    wrote), else 'class 1'..'class K' with ids 1..K, K read from the checkpoint."""
    if categories_file:
        return read_categories(categories_file)
    located = checkpoint_io.locate(checkpoint)
    if located.categories_file:
        return read_categories(located.categories_file)
    num_classes = checkpoint_io.num_classes(located)
    if num_classes is None:
        raise ValueError(f'{checkpoint} has no box classifier (a backbone-only checkpoint?): '
                         f'predict needs a whole detector')
    logging.warning('No %s with %s and no --categories: naming the %d classes '
                    '"class 1".."class %d", with category ids 1..%d.', CATEGORIES_FILENAME,
                    checkpoint, num_classes, num_classes, num_classes)
    return list(range(1, num_classes + 1)), [f'class {k}' for k in range(1, num_classes + 1)]


def restore_variables(checkpoint: str, model: MaskRCNNModel,
                      padded_size: Sequence[int]) -> dict[str, Any]:
    """The detector's variables ({'params', ...model_state}) from any checkpoint
    `checkpoint_io.locate` accepts, as numpy, with exactly the model's arrays.

    Raises ValueError naming the arrays whose shapes differ from what `model` builds,
    e.g. when the config is not the one the checkpoint was trained with.
    """
    located = checkpoint_io.locate(checkpoint)
    restored = checkpoint_io.restore(located)
    variables = {'params': restored['params'], **restored['model_state']}
    expected = jax.eval_shape(lambda: model.flax_model.init(
        jax.random.PRNGKey(0), np.zeros((1, *padded_size, 3), np.float32),
        np.asarray([padded_size], np.int32), train=False))
    _check_shapes(variables, expected, located.item_dir)
    logging.info('Restored parameters from %s (%s)', located.item_dir, located.kind)
    # A converted checkpoint carries both batch-norm layouts; keep the model's arrays only.
    return _select_like(variables, expected)


def _select_like(tree: Any, like: Any) -> Any:
    """The entries of nested dict `tree` at the keys of `like` (same nesting)."""
    if not hasattr(like, 'items'):
        return tree
    return {k: _select_like(tree[k], v) for k, v in like.items()}


def _check_shapes(variables: Any, expected: Any, where: str) -> None:
    def flat_shapes(tree):
        return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(np.shape(v))
                for path, v in jax.tree_util.tree_leaves_with_path(tree)}

    flat, want = flat_shapes(variables), flat_shapes(expected)
    problems = [f'{k}: checkpoint {flat.get(k, "missing")}, model {s}'
                for k, s in want.items() if flat.get(k) != s]
    if problems:
        raise ValueError(f'{where} does not fit the model the config builds ({len(problems)} '
                         f'arrays differ; is it the config of that run?): '
                         + '; '.join(problems[:10]))


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> MaskRCNNModel:
    return MaskRCNNModel(config, {'num_classes': num_classes})


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------

def list_images(path: str) -> list[str]:
    """`path` itself if it is a file, else the image files directly inside it, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f'--input={path} is neither a file nor a directory')
    names = sorted(n for n in os.listdir(path) if not n.startswith('.'))
    images = [os.path.join(path, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
              and os.path.isfile(os.path.join(path, n))]
    if len(images) < len(names):
        logging.info('Ignoring %d entries of %s that are not image files.',
                     len(names) - len(images), path)
    return images


def load_image(path: str) -> np.ndarray:
    """uint8 RGB [h, w, 3], the pixels training sees for the file (data/image_io.py: EXIF
    orientation applied, 16-bit, alpha, CMYK). Raises on unreadable files."""
    with open(path, 'rb') as f:
        return image_io.decode(f.read())


def parse_image_sizes(text: str | None, default: Sequence[int]) -> list[tuple[int, int]]:
    """'640x640,1344x1344' -> [(640, 640), (1344, 1344)]; None or '' -> [default]."""
    if not text:
        return [tuple(int(s) for s in default)]
    try:
        sizes = [tuple(int(s) for s in item.lower().split('x')) for item in text.split(',')]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f'--image_sizes={text!r}: expected HxW[,HxW...]')
    return sizes


def choose_size(height: int, width: int, sizes: Sequence[Sequence[int]], min_size: float,
                max_size: float, resize_rounding: str = 'round') -> tuple[int, int]:
    """The smallest padded size (by area) that holds the resized image unshrunk; if none
    does, the largest (where the image is shrunk further to fit, as in the pipeline)."""
    unbounded = (1 << 30, 1 << 30)
    _, new_h, new_w = serving_loader.resize_scale(height, width, min_size, max_size, unbounded,
                                                  resize_rounding)
    by_area = sorted((tuple(s) for s in sizes), key=lambda s: s[0] * s[1])
    for size in by_area:
        if new_h <= size[0] and new_w <= size[1]:
            return size
    return by_area[-1]


def preprocess_image(image: np.ndarray, settings: dict[str, Any],
                     sizes: Sequence[Sequence[int]]
                     ) -> tuple[tuple[int, int], np.ndarray, np.ndarray, float]:
    """(padded size, model input [H, W, 3], image_size [2], scale) of one uint8 RGB
    image, resized by the dataset `settings` (`dataset_settings`) into one of `sizes`."""
    s = settings
    size = choose_size(image.shape[0], image.shape[1], sizes, s['eval_min_size'],
                       s['max_size'], s['resize_rounding'])
    inputs, image_size, scale = serving_loader.preprocess(
        image, padded_size=size, min_size=s['eval_min_size'], max_size=s['max_size'],
        pixel_mean=s['pixel_mean'], pixel_std=s['pixel_std'],
        channel_order=s.get('channel_order', 'RGB'), resize_rounding=s['resize_rounding'])
    return size, inputs, image_size, scale


# ----------------------------------------------------------------------------
# Detections to results and pictures
# ----------------------------------------------------------------------------

def image_results(outputs: dict[str, np.ndarray], *, image_id: int, file_name: str,
                  orig_size: Sequence[int], image_size: Sequence[int],
                  category_ids: Sequence[int], category_names: Sequence[str],
                  score_threshold: float) -> list[dict[str, Any]]:
    """COCO results of one image's detections (the detector's outputs without the batch
    dimension), with `file_name` and `category_name` added; see `evaluation`.

    Boxes go back to the original pixels per axis (orig_size / image_size, the
    resized (height, width)), as torchvision and Detectron2 map them.
    """
    ratio = np.asarray(image_size, np.float64) / np.asarray(orig_size, np.float64)
    classes = np.asarray(outputs['detection_classes']).astype(np.int64)
    scores = np.asarray(outputs['detection_scores'])
    keep = (np.asarray(outputs['detection_valid'], bool) & (classes > 0)
            & (scores >= score_threshold))
    results = evaluation.image_detections_to_coco(
        np.asarray(outputs['detection_boxes'])[keep], scores[keep], classes[keep],
        np.asarray(outputs['detection_masks'])[keep], image_id, tuple(orig_size),
        (float(ratio[0]), float(ratio[1])), np.asarray(category_ids))
    for result, label in zip(results, classes[keep]):
        result['file_name'] = file_name
        result['category_name'] = category_names[label - 1]
    return results


def draw_results(image: np.ndarray, results: Sequence[dict[str, Any]],
                 category_ids: Sequence[int], category_names: Sequence[str]) -> np.ndarray:
    """The image with the masks, boxes, names and scores of its COCO results drawn."""
    if not results:
        return image.copy()
    label_of = {c: i + 1 for i, c in enumerate(category_ids)}
    xywh = np.asarray([r['bbox'] for r in results], np.float64)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    masks = None
    if all('segmentation' in r for r in results):
        masks = mask_utils.decode([r['segmentation'] for r in results]).transpose(2, 0, 1)
    return visualization.draw_instances(
        image, boxes, np.asarray([label_of[r['category_id']] for r in results]),
        np.asarray([r['score'] for r in results]), masks, category_names)


def _png_name(path: str, taken: set[str]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = f'{stem}.png', 1
    while name in taken:
        name, n = f'{stem}_{n}.png', n + 1
    taken.add(name)
    return name


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

class Predictor:
    """A restored detector that turns image files into results, PNGs and a skip list."""

    def __init__(self, config: ml_collections.ConfigDict, checkpoint: str, *,
                 image_sizes: str | None = None, categories_file: str | None = None,
                 batch_size: int | None = None):
        self.settings = dataset_settings(config)
        self.sizes = parse_image_sizes(image_sizes, self.settings['image_size'])
        self.category_ids, self.category_names = load_categories(checkpoint, categories_file)
        model = build_model(config, len(self.category_ids))
        self.variables = jax.device_put(restore_variables(checkpoint, model, self.sizes[0]))
        self.batch_size = int(batch_size or config.eval_batch_size)

        def infer(variables, images, image_sizes):
            return model.flax_model.apply(variables, images, image_sizes, train=False)

        self._infer = jax.jit(infer)

    def preprocess(self, image: np.ndarray) -> tuple[tuple[int, int], np.ndarray, np.ndarray,
                                                      float]:
        """(padded size, model input [H, W, 3], image_size [2], scale) of one image."""
        return preprocess_image(image, self.settings, self.sizes)

    def _dispatch(self, size: tuple[int, int], entries: list[dict[str, Any]]):
        """Starts the model on up to batch_size entries (zero-padded, as in evaluation)."""
        images = np.zeros((self.batch_size, *size, 3), np.float32)
        image_sizes = np.zeros((self.batch_size, 2), np.int32)
        for i, entry in enumerate(entries):
            images[i], image_sizes[i] = entry.pop('inputs'), entry['image_size']
        return entries, self._infer(self.variables, images, image_sizes)

    def run(self, files: Sequence[str], output_dir: str, score_threshold: float
            ) -> dict[str, Any]:
        """Predicts every file; writes the outputs of the module docstring.

        Returns:
          {'images': [COCO image dicts], 'results': [COCO results],
           'skipped': [{'file_name', 'error'}]}.
        """
        vis_dir = os.path.join(output_dir, 'visualizations')
        os.makedirs(vis_dir, exist_ok=True)
        out = {'images': [], 'results': [], 'skipped': []}
        pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
        in_flight, png_names = [], set()
        progress = tqdm.tqdm(total=len(files), unit='image', desc='predict',
                             disable=None)  # no bar when stderr is not a terminal

        def finish(entries, outputs):
            outputs = jax.device_get(outputs)
            for i, entry in enumerate(entries):
                self._write_image(entry, {k: v[i] for k, v in outputs.items()},
                                  vis_dir, png_names, score_threshold, out)
                progress.update()

        def flush(size):
            in_flight.append(self._dispatch(size, pending.pop(size)))
            if len(in_flight) > 1:  # decode the next batch while this one runs
                finish(*in_flight.pop(0))

        for image_id, path in enumerate(files, start=1):
            try:
                image = load_image(path)
            except Exception as e:  # pylint: disable=broad-except  # any unreadable file
                error = f'{type(e).__name__}: {e}'
                logging.warning('Skipping %s: %s', path, error)
                out['skipped'].append({'file_name': path, 'error': error})
                progress.update()
                continue
            size, inputs, image_size, scale = self.preprocess(image)
            pending.setdefault(size, []).append(dict(
                path=path, image_id=image_id, image=image, inputs=inputs,
                image_size=image_size, scale=scale))
            if len(pending[size]) == self.batch_size:
                flush(size)
        for size in list(pending):
            flush(size)
        while in_flight:
            finish(*in_flight.pop(0))
        progress.close()
        return out

    def _write_image(self, entry, outputs, vis_dir, png_names, score_threshold, out):
        image = entry['image']
        file_name = os.path.basename(entry['path'])
        results = image_results(
            outputs, image_id=entry['image_id'], file_name=file_name,
            orig_size=image.shape[:2], image_size=entry['image_size'],
            category_ids=self.category_ids,
            category_names=self.category_names, score_threshold=score_threshold)
        png = _png_name(entry['path'], png_names)
        Image.fromarray(draw_results(image, results, self.category_ids,
                                     self.category_names)).save(os.path.join(vis_dir, png))
        out['results'].extend(results)
        out['images'].append({'id': entry['image_id'], 'file_name': file_name,
                              'path': entry['path'], 'height': int(image.shape[0]),
                              'width': int(image.shape[1]),
                              'visualization': os.path.join('visualizations', png)})


def write_outputs(output_dir: str, out: dict[str, Any], category_ids: Sequence[int],
                  category_names: Sequence[str]) -> None:
    """predictions.json, images.json and skipped.txt (see the module docstring)."""
    with open(os.path.join(output_dir, 'predictions.json'), 'w', encoding='utf-8') as f:
        json.dump(out['results'], f)
    categories = [{'id': int(i), 'name': n} for i, n in zip(category_ids, category_names)]
    with open(os.path.join(output_dir, 'images.json'), 'w', encoding='utf-8') as f:
        json.dump({'images': out['images'], 'categories': categories,
                   'skipped': out['skipped']}, f, indent=1)
    with open(os.path.join(output_dir, 'skipped.txt'), 'w', encoding='utf-8') as f:
        f.writelines(f'{s["file_name"]}\t{s["error"]}\n' for s in out['skipped'])


def predict(config: ml_collections.ConfigDict, checkpoint: str, input_path: str,
            output_dir: str, *, score_threshold: float = 0.5, image_sizes: str | None = None,
            categories_file: str | None = None, batch_size: int | None = None
            ) -> dict[str, Any]:
    """The whole command: restores, predicts every image of `input_path`, writes outputs."""
    files = list_images(input_path)
    if not files:
        logging.warning('No image files in %s.', input_path)
    predictor = Predictor(config, checkpoint, image_sizes=image_sizes,
                          categories_file=categories_file, batch_size=batch_size)
    out = predictor.run(files, output_dir, score_threshold)
    write_outputs(output_dir, out, predictor.category_ids, predictor.category_names)
    logging.info('%d images, %d detections with score >= %g, %d skipped; outputs in %s',
                 len(out['images']), len(out['results']), score_threshold,
                 len(out['skipped']), output_dir)
    return out


def _define_flags() -> None:
    # Defined only when run as a program, so that importing this module next to
    # another one that defines --config (main.py's runtime) is fine.
    config_flags.DEFINE_config_file('config', None, 'The training config file.',
                                    lock_config=False)
    flags.DEFINE_string('checkpoint', None, 'Training workdir, its checkpoints/ directory, '
                        'one step directory (the latest step is used) or a converted '
                        'checkpoint directory.')
    flags.DEFINE_string('input', None, 'An image file or a directory of images.')
    flags.DEFINE_string('output', None, 'Directory for the outputs.')
    flags.DEFINE_float('score_threshold', 0.5, 'Smallest score written and drawn.')
    flags.DEFINE_string('image_sizes', None, 'Static padded sizes, "HxW,HxW"; default '
                        'the config\'s dataset_configs.image_size.')
    flags.DEFINE_string('categories', None, 'json with a COCO "categories" list; default '
                        'the checkpoint\'s categories.json.')
    flags.DEFINE_integer('batch_size', None, 'Images per batch; default eval_batch_size.')
    flags.mark_flags_as_required(['config', 'checkpoint', 'input', 'output'])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    # TensorFlow is only imported for the dataset settings: keep it off accelerators.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
    f = flags.FLAGS
    out = predict(f.config, f.checkpoint, f.input, f.output,
                  score_threshold=f.score_threshold, image_sizes=f.image_sizes,
                  categories_file=f.categories, batch_size=f.batch_size)
    print(f'{len(out["images"])} images, {len(out["results"])} detections, '
          f'{len(out["skipped"])} skipped -> {f.output}', file=sys.stderr)


if __name__ == '__main__':
    _define_flags()
    app.run(main)
