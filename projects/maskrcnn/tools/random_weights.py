"""Seeded random weights for torchvision-layout state dicts, in plain numpy.

Both sides of the golden parity test draw the same weights from this module:
tools/make_golden.py (run where torch is installed, but no jax) fills
torchvision's Mask R-CNN with them, and the JAX test rebuilds them from the
(name, shape) list stored in the golden file. So this module imports nothing
but numpy.

Each tensor has its own generator, seeded by (seed, crc32(name)), so a tensor's
values do not depend on which other tensors are drawn. The scales keep the
activations of a 50-layer network in a sane range and make the heads' outputs
spread out (distinct proposals, scores and masks):
- convolution and linear weights: He normal, sqrt(2 / fan_in), times a gain
  per layer (`GAINS`, matched on the name); the rows of the mask logits
  (`CENTRED`) have their mean removed;
- batch norm: weight U(0.5, 1) (U(0.1, 0.3) for the last norm of a residual
  branch, so that the residual sum grows slowly), bias N(0, 0.1),
  running_mean N(0, 0.1), running_var U(0.5, 2);
- other biases N(0, 0.1) times the same gain;
- integer tensors (num_batches_tracked): zero.
"""

import zlib
from collections.abc import Iterable

import numpy as np

# Multipliers of the He scale, matched in this order against the tensor's name.
GAINS = (
    ('rpn.head.cls_logits', 0.25),     # logits within a few units: sigmoids do not tie
    ('rpn.head.bbox_pred', 0.2),       # proposals stay near their anchors
    ('box_predictor.cls_score', 1.0),
    ('box_predictor.bbox_pred', 1.0),
    ('mask_predictor.mask_fcn_logits', 3.0),  # mask probabilities away from 0.5
)

# Outputs whose weight rows get zero mean: their inputs follow a ReLU and share
# a positive mean, which would otherwise turn nearly every mask pixel on.
CENTRED = ('mask_predictor.mask_fcn_logits',)


def _gain(name: str) -> float:
    for pattern, gain in GAINS:
        if pattern in name:
            return gain
    return 1.0


def _is_branch_end(name: str, names: set[str]) -> bool:
    """bn3 of a bottleneck, or bn2 of a basic block (which has no conv3)."""
    prefix = name.rsplit('.', 2)[0]  # e.g. 'backbone.body.layer1.0'
    norm = name.rsplit('.', 2)[1]
    if norm == 'bn3':
        return True
    return norm == 'bn2' and f'{prefix}.conv3.weight' not in names


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    if name.endswith('conv5_mask.weight') or 'deconv' in name:
        # A 2x2 stride-2 transposed conv: each output sees one input position.
        return int(shape[0])
    return int(np.prod(shape[1:]))


def random_tensor(name: str, shape: tuple[int, ...], seed: int,
                  names: set[str] | None = None) -> np.ndarray:
    """One tensor of a torchvision-layout state dict (see the module docstring).

    Args:
      name: the state-dict key, e.g. 'backbone.body.layer1.0.bn3.weight'.
      shape: its shape (OIHW convolutions, [out, in] linear layers).
      seed: the global seed.
      names: every key of the state dict (to tell basic blocks from bottlenecks).
    """
    names = names or set()
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    leaf = name.rsplit('.', 1)[-1]
    if leaf == 'num_batches_tracked':
        return np.zeros(shape, np.int64)
    if leaf == 'running_mean':
        return rng.normal(0.0, 0.1, shape).astype(np.float32)
    if leaf == 'running_var':
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    is_norm = len(shape) == 1 and (f'{name.rsplit(".", 1)[0]}.running_mean' in names)
    if is_norm and leaf == 'weight':
        lo, hi = (0.1, 0.3) if _is_branch_end(name, names) else (0.5, 1.0)
        return rng.uniform(lo, hi, shape).astype(np.float32)
    if leaf == 'bias':
        scale = 0.1 if is_norm else 0.1 * _gain(name)
        return rng.normal(0.0, scale, shape).astype(np.float32)
    if leaf == 'weight' and len(shape) >= 2:
        std = np.sqrt(2.0 / _fan_in(name, shape)) * _gain(name)
        weight = rng.normal(0.0, std, shape)
        if any(pattern in name for pattern in CENTRED):
            weight -= weight.reshape(shape[0], -1).mean(1).reshape((-1,) + (1,) * (len(shape) - 1))
        return weight.astype(np.float32)
    raise ValueError(f'random_weights: no rule for {name} with shape {shape}')


def random_state_dict(names_and_shapes: Iterable[tuple[str, tuple[int, ...]]],
                      seed: int) -> dict[str, np.ndarray]:
    """A whole state dict: {name: array} for the given (name, shape) pairs."""
    pairs = [(str(n), tuple(s)) for n, s in names_and_shapes]
    names = {n for n, _ in pairs}
    return {n: random_tensor(n, s, seed, names) for n, s in pairs}
