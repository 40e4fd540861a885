"""Convolutions on the CPU backend through oneDNN, built on first use.

XLA:CPU runs a convolution at its matmul rate or below (about 150-170 GFLOP/s
in float32 on two AVX-512 cores, and a bfloat16 convolution no faster, off the
CPU's AMX units), where oneDNN's convolutions run 1.0-1.7x faster in float32
and 2-9x faster in bfloat16 on the same cores (benchmarks/conv_grad_microbenchmark.py).
`conv` runs a 2-D NHWC/HWIO convolution, its input gradient and its kernel
gradient as three XLA FFI custom calls into oneDNN (onednn_conv.cc).

The C++ source is compiled once, with the system's C++ compiler ($CXX, else
c++) against the `onednn-cpu-gomp` and `onednn-devel-cpu-gomp` wheels and
JAX's FFI headers, into $XDG_CACHE_HOME/detectax (default ~/.cache/detectax),
one library per source, compiler, JAX and oneDNN version. `status()` says
whether the kernels are usable and, if not, why. `enabled(dtype)` is what the
`conv` primitive (kernels/__init__.py) consults, from DETECTAX_CPU_KERNELS
(kernels/switches.py):
- auto (default): on the CPU backend with one device, where the kernels build
  and oneDNN supports the dtype on this CPU; otherwise the XLA lowering, with
  one warning that says why (the custom calls have no sharding rule, so on
  several devices XLA would repeat each convolution on every one);
- onednn: always on the CPU backend, and a clear error if they cannot be used;
- matmul, xla: never.
`portable()` turns them off while tracing something that must run without this
library (`jax.export` artifacts, export.py).
"""

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import threading

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from projects.maskrcnn.kernels import switches

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'onednn_conv.cc')
LIBRARY_DIST, HEADERS_DIST = 'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'
_FORWARD = 'detectax_onednn_conv_forward'
_INPUT_GRAD = 'detectax_onednn_conv_input_grad'
_KERNEL_GRAD = 'detectax_onednn_conv_kernel_grad'
# FFI target name -> the handler symbol in the library.
_TARGETS = {_FORWARD: 'DetectaxOnednnConvForward', _INPUT_GRAD: 'DetectaxOnednnConvInputGrad',
            _KERNEL_GRAD: 'DetectaxOnednnConvKernelGrad'}
_PROBE_DTYPES = {'float32': 0, 'bfloat16': 1}

_portable = contextvars.ContextVar('detectax_onednn_portable', default=False)
_lock = threading.Lock()
_warned = False


@dataclasses.dataclass(frozen=True)
class Status:
    available: bool
    reason: str                   # why not, when not available
    dtypes: tuple[str, ...] = ()  # operand dtypes oneDNN runs on this CPU
    library: str | None = None    # the compiled library
    version: str = ''             # oneDNN's, e.g. 3.2.0


class _DnnlVersion(ctypes.Structure):
    _fields_ = [('major', ctypes.c_int), ('minor', ctypes.c_int), ('patch', ctypes.c_int)]


def _dist_file(dist: str, suffix: str) -> str:
    for f in importlib.metadata.distribution(dist).files or ():
        if ('/' + str(f).replace(os.sep, '/')).endswith('/' + suffix):
            return os.path.normpath(str(f.locate()))
    raise FileNotFoundError(f'the {dist} package has no file {suffix}')


def build() -> str:
    """Compiles onednn_conv.cc unless the cache has it; returns the library's path."""
    include = os.path.dirname(os.path.dirname(os.path.dirname(
        _dist_file(HEADERS_DIST, 'oneapi/dnnl/dnnl.hpp'))))
    libdir = os.path.dirname(_dist_file(LIBRARY_DIST, 'libdnnl.so.3'))
    cxx = shutil.which(os.environ.get('CXX', 'c++'))
    if cxx is None:
        raise FileNotFoundError(f'no C++ compiler ({os.environ.get("CXX", "c++")!r}; set CXX)')
    with open(SOURCE, 'rb') as f:
        source = f.read()
    versions = [jax.__version__, importlib.metadata.version('jaxlib'),
                importlib.metadata.version(LIBRARY_DIST),
                importlib.metadata.version(HEADERS_DIST), cxx, include, libdir]
    key = hashlib.sha256(source + '\0'.join(versions).encode()).hexdigest()[:16]
    out = os.path.join(switches.cache_dir(), f'libdetectax_onednn_{key}.so')
    if os.path.exists(out):
        return out
    os.makedirs(switches.cache_dir(), exist_ok=True)
    tmp = f'{out}.{os.getpid()}.tmp'
    cmd = [cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', f'-I{include}',
           f'-I{jax.ffi.include_dir()}', SOURCE, f'-L{libdir}', '-l:libdnnl.so.3',
           f'-Wl,-rpath,{libdir}', '-o', tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f'compiling {SOURCE} failed (exit {proc.returncode}): '
                           f'{" ".join(cmd)}\n{proc.stderr[-3000:]}')
    os.replace(tmp, out)  # atomic: concurrent builders each write their own tmp
    return out


@functools.cache
def status() -> Status:
    """Builds, loads and registers the kernels once per process."""
    try:
        path = build()
        lib = ctypes.CDLL(path)
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform='cpu')
        lib.DetectaxOnednnSupports.restype = ctypes.c_int
        dtypes = tuple(name for name, code in _PROBE_DTYPES.items()
                       if lib.DetectaxOnednnSupports(code))
        lib.dnnl_version.restype = ctypes.POINTER(_DnnlVersion)
        v = lib.dnnl_version().contents
        version = f'{v.major}.{v.minor}.{v.patch}'
    except (importlib.metadata.PackageNotFoundError, OSError, RuntimeError) as e:
        reason = (f'{e.name} is not installed (pip install {LIBRARY_DIST} {HEADERS_DIST})'
                  if isinstance(e, importlib.metadata.PackageNotFoundError) else str(e))
        return Status(False, reason)
    if not dtypes:
        return Status(False, 'oneDNN supports neither float32 nor bfloat16 convolutions here',
                      library=path, version=version)
    return Status(True, '', dtypes, path, version)


def describe(dtype) -> str:
    """Which convolutions a model in `dtype` gets, for benchmark tables."""
    if enabled(dtype):
        forward, gradient = threads()
        return (f'convolutions through oneDNN {status().version} ({forward} thread(s) per forward '
                f'call, {gradient} per gradient call)')
    return (f'convolutions as XLA lowers them '
            f'({switches.CPU_KERNELS_ENV}={switches.cpu_kernels()})')


@contextlib.contextmanager
def portable():
    """XLA's convolutions only while tracing inside this block (artifacts that must run
    without this library, on any platform)."""
    token = _portable.set(True)
    try:
        yield
    finally:
        _portable.reset(token)


def enabled(dtype) -> bool:
    """Whether `conv` should run a convolution with operands of `dtype` (read at trace time)."""
    global _warned
    m = switches.cpu_kernels()
    if m in ('matmul', 'xla') or _portable.get() or jax.default_backend() != 'cpu':
        return False
    with _lock:
        st = status()
    name = jnp.dtype(dtype).name
    if m == 'auto' and jax.device_count() > 1:
        # XLA's SPMD partitioner would gather a sharded batch onto every device for a
        # custom call without a sharding rule, and repeat the whole convolution there.
        why = (f'the custom calls have no sharding rule, and there are {jax.device_count()} '
               'devices')
    elif st.available and name in st.dtypes:
        return True
    else:
        why = st.reason if not st.available else f'oneDNN does not run {name} on this CPU'
    if m == 'onednn':
        raise RuntimeError(f'{switches.CPU_KERNELS_ENV}=onednn, but the oneDNN convolutions '
                           f'cannot be used: {why}')
    if not _warned:
        _warned = True
        logging.warning('Convolutions run as XLA lowers them, not through oneDNN: %s', why)
    return False


def threads() -> tuple[int, int]:
    """OpenMP threads of each forward call and of each gradient call, from
    DETECTAX_ONEDNN_THREADS ('auto' or 'F,G'; kernels/switches.py). The default, all
    cores for a forward call and one per gradient call, was 1.06x faster than one
    everywhere, and one per call 1.15x faster than two, in the bfloat16 training step
    (BENCHMARKS.md, seventh round, `ab_train_step --env_a`)."""
    return switches.onednn_threads()


@functools.cache
def _primitive(target: str, strides, padding, out_shape, threads_: int):
    """The FFI call `target`(a, b) -> `out_shape` for one geometry. For the forward
    convolution and the input gradient, out_shape[0] is a's N and may vary.

    Under `jax.vmap` the mapped axis is folded into N where the kernel (b) is not
    mapped, and otherwise the elements run one call each (`lax.map`); the kernel
    gradient always runs per element (each gets its own kernel gradient).
    """
    attrs = {'strides': np.asarray(strides, np.int64),
             'padding': np.asarray([*padding[0], *padding[1]], np.int64),
             'threads': np.int64(threads_)}

    @jax.custom_batching.custom_vmap
    def call(a, b):
        shape = out_shape if target == _KERNEL_GRAD else (a.shape[0], *out_shape[1:])
        return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, a.dtype))(a, b, **attrs)

    @call.def_vmap
    def _batched(axis_size, in_batched, a, b):
        a_mapped, b_mapped = in_batched
        if a_mapped and not b_mapped and target != _KERNEL_GRAD:
            y = call(a.reshape(-1, *a.shape[2:]), b)
            return y.reshape(axis_size, -1, *y.shape[1:]), True
        a = a if a_mapped else jnp.broadcast_to(a, (axis_size, *a.shape))
        b = b if b_mapped else jnp.broadcast_to(b, (axis_size, *b.shape))
        return jax.lax.map(lambda ab: call(*ab), (a, b)), True

    return call


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]):
    """y = conv(x [N, H, W, C], kernel [kh, kw, C, F]) -> [N, Ho, Wo, F] in x's dtype.

    Same-dtype operands, float32 or bfloat16 (summed in float32, rounded once).
    Its gradients are oneDNN's backward-data and backward-weights convolutions.
    """
    with _lock:
        st = status()
    if not st.available:
        raise RuntimeError(f'the oneDNN convolutions cannot be used: {st.reason}')
    n, h, w, _ = x.shape
    kh, kw, _, f = kernel.shape
    ho = (h + padding[0][0] + padding[0][1] - kh) // strides[0] + 1
    wo = (w + padding[1][0] + padding[1][1] - kw) // strides[1] + 1
    return _primitive(_FORWARD, strides, padding, (n, ho, wo, f), threads()[0])(x, kernel)


def _conv_fwd(x, kernel, strides, padding):
    return conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    gradient_threads = threads()[1]
    dx = _primitive(_INPUT_GRAD, strides, padding, x.shape, gradient_threads)(dy, kernel)
    dkernel = _primitive(_KERNEL_GRAD, strides, padding, kernel.shape, gradient_threads)(x, dy)
    return dx, dkernel


conv.defvjp(_conv_fwd, _conv_bwd)
