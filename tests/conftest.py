import os
import tempfile

# Quiet TensorFlow, keep JAX on the CPU, and share compiled programs between the
# tests (and the pytest-xdist workers): several tests compile the same tiny model.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_compilation_cache_dir',
                  os.path.join(tempfile.gettempdir(), 'detectax_test_jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
