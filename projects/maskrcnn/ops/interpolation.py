"""PyTorch's 1-D resampling rules as interpolation matrices (numpy, static shapes).

A resize of a separable kind is one matrix per axis: out = M_h @ x @ M_w^T.
Building the matrices on the host, as numpy constants, keeps the model's
arithmetic a plain einsum whose result matches `torch.nn.functional.interpolate`
to float32 rounding. `jax.image.resize(..., 'bicubic')` does not: it uses the
Keys kernel with A = -0.5 and renormalises the weights at the borders, where
PyTorch uses A = -0.75 and repeats the edge sample.

The arithmetic follows PyTorch's `upsample_bicubic2d` and `upsample_linear1d`
CPU kernels with `align_corners=False`, no `scale_factor`, no antialiasing.
"""

import numpy as np

BICUBIC_A = -0.75  # PyTorch's cubic convolution coefficient


def _source_coordinates(in_size: int, out_size: int) -> np.ndarray:
    """Half-pixel source coordinate of each output sample (align_corners False)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f'sizes must be positive, got in_size={in_size}, out_size={out_size}')
    scale = in_size / out_size
    return (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Weights of the four taps at offsets -1, 0, 1, 2 for fractional position t.

    The Keys kernel: 1 - (a + 3) x^2 + (a + 2) |x|^3 for |x| <= 1 and
    a (|x|^3 - 5 x^2 + 8 |x| - 4) for 1 < |x| < 2.
    """
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, a: float = BICUBIC_A) -> np.ndarray:
    """[out_size, in_size] float64 matrix of PyTorch's bicubic resize along one axis.

    The source coordinate is not clamped (PyTorch clamps it for linear modes
    only); the four taps are clamped to [0, in_size - 1], so border samples
    repeat and their weights add up.
    """
    src = _source_coordinates(in_size, out_size)
    floor = np.floor(src)
    weights = _cubic_weights(src - floor, a)  # [out, 4]
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], taps.shape)
    np.add.at(matrix, (rows, taps), weights)
    return matrix


def linear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 matrix of PyTorch's linear resize (align_corners False).

    Negative source coordinates clamp to 0; the right tap clamps to in_size - 1.
    """
    src = np.maximum(_source_coordinates(in_size, out_size), 0.0)
    left = np.floor(src).astype(np.int64)
    frac = src - left
    left = np.minimum(left, in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, left), 1.0 - frac)
    np.add.at(matrix, (rows, right), frac)
    return matrix
