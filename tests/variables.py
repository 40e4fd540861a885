"""Model variables for tests, drawn with numpy: compiling the Flax initialisers of a
whole detector takes seconds on the CPU, filling `jax.eval_shape`'s tree does not."""

import jax
import jax.numpy as jnp
import numpy as np


def fill_variables(shapes, seed: int = 0, kernel_gain: float = 1.0):
    """Values for a tree of ShapeDtypeStructs: kernels N(0, kernel_gain / fan_in),
    norm scales and variances 1, everything else (biases, means) N(0, 0.1)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == 'kernel':
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(kernel_gain / fan_in), s.shape), s.dtype)
        if name in ('scale', 'var'):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)
