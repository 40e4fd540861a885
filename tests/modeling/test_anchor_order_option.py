"""model.anchors.order reaches the anchors the detector's RPN is trained and decoded with."""

import jax
import jax.numpy as jnp
import numpy as np

from projects.maskrcnn.modeling import specs
from projects.maskrcnn.modeling.detector import MaskRCNN
from projects.maskrcnn.ops import anchors as anchor_ops


def test_detector_anchors_follow_the_order_option(monkeypatch):
    seen, original = [], anchor_ops.pyramid_anchors

    def recording(*args):
        out = original(*args)
        seen.append(np.concatenate(out))
        return out

    monkeypatch.setattr('projects.maskrcnn.modeling.detector.anchor_ops.pyramid_anchors',
                        recording)
    sizes = ((16, 32),) * 5
    features = [jax.ShapeDtypeStruct((1, 32 // 2 ** i, 32 // 2 ** i, 8), jnp.float32)
                for i in range(5)]
    image_sizes = jax.ShapeDtypeStruct((1, 2), jnp.float32)
    for order in ('size_major', 'ratio_major'):
        model = MaskRCNN(num_classes=2, fpn=specs.FPNSpec(channels=8),
                         anchors=specs.AnchorSpec(sizes=sizes, order=order))
        jax.eval_shape(lambda f, s, m=model: m.init(jax.random.PRNGKey(0), f, s,
                                                    method=MaskRCNN.propose),
                       features, image_sizes)
    size_major, ratio_major = seen[0], seen[-1]
    expected = np.concatenate(original(
        [(32 // 2 ** i,) * 2 for i in range(5)], [4, 8, 16, 32, 64], sizes, (0.5, 1.0, 2.0),
        order='ratio_major'))
    np.testing.assert_array_equal(ratio_major, expected)
    assert not np.array_equal(size_major, ratio_major)
