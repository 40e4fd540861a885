r"""Multi-level RoIAlign on the CPU: the gather form against the matrix form.

  python -m benchmarks.roi_align_benchmark --image=128,128 --batch=8 --boxes=64 \
      --channels=64 --output_size=7

Times the forward pass and the forward plus feature gradient of
`ops/roi_align.multilevel_roi_align` over a batch of P2-P5 pyramids for
`impl='gather'` and `impl='matmul'`, checks that they agree, and prints what
`impl='auto'` would pick and the cost ratio (`choose_impl`) it decides from.
"""

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from projects.maskrcnn.kernels import host_memory
from projects.maskrcnn.ops import roi_align

STRIDES = (4, 8, 16, 32)


def define_flags() -> None:
    flags.DEFINE_list('image', ['128', '128'], 'Padded image H,W.')
    flags.DEFINE_integer('batch', 8, 'Images.')
    flags.DEFINE_integer('boxes', 64, 'Boxes per image.')
    flags.DEFINE_integer('channels', 64, 'Feature channels.')
    flags.DEFINE_integer('output_size', 7, 'Bins per side.')
    flags.DEFINE_integer('sampling_ratio', 2, 'Samples per bin and axis.')
    flags.DEFINE_integer('reps', 5, 'Timed runs (median).')


def random_inputs(image_hw, batch, boxes, channels, seed=0):
    """A batch of pyramids and boxes of all sizes inside the image."""
    rng = np.random.default_rng(seed)
    h, w = image_hw
    feats = [jnp.asarray(rng.normal(size=(batch, h // s, w // s, channels)), jnp.float32)
             for s in STRIDES]
    side = np.exp(rng.uniform(np.log(4.0), np.log(min(h, w)), (batch, boxes)))
    x0 = rng.uniform(0, w - side)
    y0 = rng.uniform(0, h - side)
    box = np.stack([x0, y0, x0 + side, y0 + side], axis=-1).astype(np.float32)
    return feats, jnp.asarray(box)


def main(argv):
    del argv
    f = flags.FLAGS
    image_hw = tuple(int(v) for v in f.image)
    feats, boxes = random_inputs(image_hw, f.batch, f.boxes, f.channels)
    canonical = 224.0 * min(image_hw) / 800.0   # the level rule scaled to the image
    cotangent = jnp.ones((f.batch, f.boxes, f.output_size, f.output_size, f.channels))

    def pool(impl):
        def one(fs, b):
            return roi_align.multilevel_roi_align(fs, STRIDES, b, f.output_size,
                                                  f.sampling_ratio, True, 2, canonical,
                                                  impl=impl)
        return jax.vmap(one)

    results = {}
    for impl in ('gather', 'matmul'):
        fwd = jax.jit(pool(impl))
        # value_and_grad runs the forward pass too (the gradient alone does not need it).
        pooled = pool(impl)
        grad = jax.jit(jax.value_and_grad(
            lambda fs, b, p=pooled: jnp.sum(p(fs, b) * cotangent)))
        results[impl] = (fwd(feats, boxes), timing.median_seconds(fwd, feats, boxes, reps=f.reps),
                         timing.median_seconds(grad, feats, boxes, reps=f.reps))
    np.testing.assert_allclose(results['matmul'][0], results['gather'][0], rtol=1e-4, atol=1e-4)
    shapes = [x.shape[1:] for x in feats]
    rows = sum(s[0] for s in shapes)
    max_w = max(s[1] for s in shapes)
    ratio = ((f.output_size * rows * max_w + f.output_size ** 2 * max_w)
             / (4 * (f.output_size * f.sampling_ratio) ** 2))
    print(f'image {image_hw}, batch {f.batch}, {f.boxes} boxes, {f.channels} channels, '
          f'{f.output_size}x{f.output_size} bins, ratio {f.sampling_ratio}')
    print(f'{"impl":8s} {"forward ms":>11s} {"fwd+grad ms":>12s}')
    for impl, (_, fwd_s, grad_s) in results.items():
        print(f'{impl:8s} {1e3 * fwd_s:11.1f} {1e3 * grad_s:12.1f}')
    print(f'matmul / gather time, fwd+grad: '
          f'{results["matmul"][2] / results["gather"][2]:.2f}; cost ratio {ratio:.1f} '
          f'(auto takes matmul at <= {roi_align.MATMUL_COST_RATIO}): auto picks '
          f'{roi_align.choose_impl(shapes, f.output_size, f.sampling_ratio)}')


if __name__ == '__main__':
    host_memory.keep_freed_memory()  # as benchmark.py and main.py do
    define_flags()
    app.run(main)
