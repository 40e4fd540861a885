r"""Compiled memory of one training step: XLA's `memory_analysis()` of the trainer's step.

  python -m benchmarks.memory_analysis --config=configs/maskrcnn_vitdet_b_100ep_coco.py \
      --height=1024 --width=1024 --batch=1 --config.dtype=bfloat16 \
      [--config.model.backbone.remat=True] [--config.model.backbone.global_attention_chunks=4] \
      [--cpu_schedule=concurrency]

Nothing is allocated or run: the model is initialised abstractly (jax.eval_shape) and the
step (`steps.train_step` with the config's optimizer, state donated as the trainer does)
is lowered and compiled for this process's first device.

On the CPU, XLA orders the step's operations by default to run independent ones side by
side, not to hold little memory: its figure then stays the same with and without
`backbone.remat`. `--cpu_schedule=memory` (the default) compiles with
`--xla_cpu_enable_concurrency_optimized_scheduler=false`, XLA's memory-minimising order,
which is the figure that rematerialisation and `backbone.global_attention_chunks` move;
`--cpu_schedule=concurrency` gives the default order's figure. It prints the compiled
program's argument bytes (parameters, optimizer state, the batch), temporaries (the
activations kept for the backward pass and every other intermediate), outputs, aliased
bytes, and arguments + temporaries, the figure to set against a GPU's memory (a donated
state's outputs reuse its arguments' buffers). The CPU backend plans its buffers its own
way; a GPU's figure comes from running the same command there.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from benchmarks import benchmark
from projects.maskrcnn import model as model_lib
from projects.maskrcnn import optim
from projects.maskrcnn import steps as step_lib
from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.modeling import registry

# The command's flags, defined by `define_flags` when run as a command (importing the
# module defines none, so tests and other commands can import it).
FLAGS = None


def define_flags() -> None:
    """Defines the command's flags (absl allows each name once per process)."""
    global FLAGS  # pylint: disable=global-statement
    FLAGS = {
        'config': config_flags.DEFINE_config_file('config', None, 'ml_collections config file.',
                                                  lock_config=False),
        'height': flags.DEFINE_integer('height', 1024, 'Image height (padded batch size).'),
        'width': flags.DEFINE_integer('width', 1024, 'Image width (padded batch size).'),
        'batch': flags.DEFINE_integer('batch', 1, 'Images per step.'),
        'num_classes': flags.DEFINE_integer('num_classes', 80, 'Foreground classes.'),
        'backbone_only': flags.DEFINE_bool(
            'backbone_only', False, "Compile only the backbone's forward and backward (the "
            'gradient of the sum of squares of its maps).'),
        'cpu_schedule': flags.DEFINE_enum(
            'cpu_schedule', 'memory', ['memory', 'concurrency'],
            "XLA:CPU's operation order: memory-minimising, or its default (concurrency)."),
    }


GB = 1e9
SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'


def set_cpu_schedule(kind: str) -> None:
    """Chooses XLA:CPU's scheduler through XLA_FLAGS; call before the backend starts.

    The flag is read once, when jax creates its CPU client (the per-compile
    `compiler_options` do not reach it).
    """
    current = os.environ.get('XLA_FLAGS', '')
    if SCHEDULER_FLAG in current:
        raise ValueError(f'XLA_FLAGS already sets {SCHEDULER_FLAG}; use --cpu_schedule instead')
    value = 'true' if kind == 'concurrency' else 'false'
    os.environ['XLA_FLAGS'] = f'{current} {SCHEDULER_FLAG}={value}'.strip()


def abstract_step(config, batch: int, height: int, width: int, num_classes: int):
    """(the jitted train step, abstract state, abstract batch) of `config`'s model."""
    d = config.dataset_configs
    meta = {'num_classes': num_classes, 'input_shape': (-1, height, width, 3),
            'max_instances': d.get('max_instances', 100), 'gt_mask_size': d.get('gt_mask_size', 28)}
    model = MaskRCNNModel(config, meta)

    def init_state():
        variables = step_lib.init_variables(model, jax.random.PRNGKey(0), meta)
        params = variables.pop('params')
        tx, _ = optim.build_optimizer(config, params)
        return step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                   model_state=dict(variables), rng=jax.random.PRNGKey(1))

    state = jax.eval_shape(init_state)
    tx, _ = optim.build_optimizer(config, state.params)
    images = benchmark.synthetic_batch(config, batch, height, width, (height, width), 3,
                                       num_classes)
    abstract_batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                            images)
    step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx),
                   donate_argnums=(0,))
    return step, state, abstract_batch


def abstract_backbone_step(config, batch: int, height: int, width: int):
    """(the jitted backbone gradient, abstract parameters, abstract images)."""
    group = config.model.backbone.to_dict()
    spec = registry.spec_from_config('backbone', group)
    dtype = model_lib.DTYPES[config.get('dtype', 'float32')]
    backbone = registry.component_of('backbone', spec).build(spec, dtype)
    images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    params = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 64, 64, 3))))

    def loss(variables, x):
        maps = backbone.apply(variables, x, train=True, rngs={'sampling': jax.random.PRNGKey(0)})
        return sum(jnp.sum(m.astype(jnp.float32) ** 2) for m in maps.values())

    return jax.jit(jax.grad(loss)), params, images


def report(memory) -> dict[str, float]:
    """The figures of a `CompiledMemoryStats`, in GB."""
    fields = {'arguments': 'argument_size_in_bytes', 'temporaries': 'temp_size_in_bytes',
              'outputs': 'output_size_in_bytes', 'aliased': 'alias_size_in_bytes',
              'generated_code': 'generated_code_size_in_bytes'}
    out = {k: getattr(memory, v) / GB for k, v in fields.items()}
    out['arguments_plus_temporaries'] = out['arguments'] + out['temporaries']
    return out


def main(argv):
    del argv
    value = {name: flag.value for name, flag in FLAGS.items()}
    set_cpu_schedule(value['cpu_schedule'])
    config = value['config']
    size = (value['batch'], value['height'], value['width'])
    if value['backbone_only']:
        step, state, batch = abstract_backbone_step(config, *size)
    else:
        step, state, batch = abstract_step(config, *size, value['num_classes'])
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    backbone = config.model.backbone
    what = 'backbone forward and backward' if value['backbone_only'] else 'training step'
    device = jax.devices()[0]
    schedule = f", {value['cpu_schedule']} schedule" if device.platform == 'cpu' else ''
    print(f'{config.experiment_name} {what}: {size[0]} x {size[1]}x{size[2]}, '
          f'dtype {config.get("dtype", "float32")}, remat {backbone.get("remat", False)}, '
          f'global_attention_chunks {backbone.get("global_attention_chunks", 1)}, '
          f'{device.device_kind}{schedule}; compiled in {seconds:.0f} s')
    print(compiled.memory_analysis())
    for name, amount in report(compiled.memory_analysis()).items():
        print(f'  {name:27s} {amount:7.2f} GB')


if __name__ == '__main__':
    define_flags()
    app.run(main)
