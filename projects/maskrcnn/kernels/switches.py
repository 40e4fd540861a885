"""The environment switches of the CPU kernels, read in this one place.

BUILD_NOTES.md ("Environment switches") says what each one is for and the measurement that
keeps it. Only the standard library is imported here.

- DETECTAX_CPU_KERNELS, on the CPU backend (other backends always get the plain `lax` calls):
  - auto (default): convolutions through oneDNN where its kernels build and run the dtype,
    else (one warning says why) the XLA:CPU matmul lowerings of kernels/cpu.py; dense
    layers, bias gradients and max pooling through kernels/cpu.py;
  - onednn: as auto, but an error where oneDNN cannot run the convolutions;
  - matmul: never oneDNN, always kernels/cpu.py (the fallback, forced);
  - xla: the plain `lax` calls, as on any other backend.
- DETECTAX_ONEDNN_THREADS: auto or F,G, the OpenMP threads of each oneDNN forward call and of
  each gradient call.
- DETECTAX_HOST_MEMORY: keep (default) or release, glibc's handling of freed memory.
"""

import os

CPU_KERNELS_ENV = 'DETECTAX_CPU_KERNELS'
CPU_KERNELS = ('auto', 'onednn', 'matmul', 'xla')
THREADS_ENV = 'DETECTAX_ONEDNN_THREADS'
HOST_MEMORY_ENV = 'DETECTAX_HOST_MEMORY'
HOST_MEMORY = ('keep', 'release')

# Switches of earlier versions, and what replaces each. They are an error rather than
# ignored, so that a setting someone relies on does not silently stop acting.
RETIRED = {
    'DETECTAX_ONEDNN': f'{CPU_KERNELS_ENV} (on -> onednn, off -> matmul, auto -> auto)',
    'DETECTAX_MATMUL': f'{CPU_KERNELS_ENV} (xla -> xla; dots and auto -> auto)',
    'DETECTAX_CONV_KERNEL_GRAD': f'{CPU_KERNELS_ENV} (xla -> xla; taps and auto -> auto)',
    'DETECTAX_NATIVE_CACHE': 'XDG_CACHE_HOME (the library goes to $XDG_CACHE_HOME/detectax)',
}


def check_retired() -> None:
    """A clear error for a retired switch still set in the environment."""
    for name, replacement in RETIRED.items():
        if name in os.environ:
            raise ValueError(f'{name} is no longer read; use {replacement} instead '
                             '(BUILD_NOTES.md, "Environment switches")')


def cpu_kernels() -> str:
    """DETECTAX_CPU_KERNELS (default auto), read when a primitive is traced."""
    check_retired()
    value = os.environ.get(CPU_KERNELS_ENV) or 'auto'
    if value not in CPU_KERNELS:
        raise ValueError(f'{CPU_KERNELS_ENV}={value!r}; expected one of {CPU_KERNELS}')
    return value


def onednn_threads() -> tuple[int, int]:
    """OpenMP threads of each oneDNN forward call and of each gradient call.

    auto: every core for a forward call (the forward pass is mostly a chain of
    convolutions), one for a gradient call (XLA runs a layer's two independent
    gradients, and other work, on its own threads at the same time).
    """
    value = os.environ.get(THREADS_ENV, 'auto')
    if value == 'auto':
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        return cores or 1, 1
    try:
        forward, gradient = (int(v) for v in value.split(','))
    except ValueError:
        forward = gradient = 0
    if forward < 1 or gradient < 1:
        raise ValueError(f'{THREADS_ENV}={value!r}; expected auto or two positive counts, '
                         'e.g. 2,1 (forward, gradient)')
    return forward, gradient


def host_memory() -> str:
    """DETECTAX_HOST_MEMORY (default keep); a clear error for any other value."""
    value = os.environ.get(HOST_MEMORY_ENV) or 'keep'
    if value not in HOST_MEMORY:
        raise ValueError(f'{HOST_MEMORY_ENV}={value!r}: expected one of {", ".join(HOST_MEMORY)}')
    return value


def cache_dir() -> str:
    """Where the compiled oneDNN library is kept: $XDG_CACHE_HOME/detectax (default
    ~/.cache/detectax)."""
    check_retired()
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'detectax')
