r"""Two source trees' training steps, timed in turns on one machine.

  git archive HEAD~1 | tar -x -C /tmp/before
  python -m benchmarks.ab_train_step --a=/tmp/before --b=. \
      --config=configs/maskrcnn_r50_fpn_torchvision_coco.py --height=512 --width=512 \
      --batch=2 --rounds=6 --steps_per_round=2 \
      --config.model.mask_head.num_fg_slots=8 --config.dtype=bfloat16

What a change buys is often smaller than the drift of a shared machine between
two benchmark runs (20-30% here). This command compiles the training step of
tree A and of tree B in two child processes, each importing the project from
its own tree, with the same config, synthetic batch (benchmark.py's) and
kept-memory allocator, and then lets them run `--steps_per_round` steps in
turn, `--rounds` times, starting with the other side each round, so that both
sides see the same machine. It prints each side's step times, their medians and
minima, and the ratio A / B (above 1: B faster), and the final losses: the same
model on the same data gives the same loss unless the change alters arithmetic.

With `--a=. --b=.` and `--env_a` / `--env_b` it times one switch of the same tree
instead, e.g. the oneDNN convolutions against the matmul fallback:

  python -m benchmarks.ab_train_step --a=. --b=. --env_a=DETECTAX_CPU_KERNELS=matmul \
      --config=configs/demo_shapes.py --height=128 --width=128 --batch=8 \
      --num_classes=3 --instances=6 --rounds=6 --steps_per_round=5
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

# Flag holders, set by define_flags() when this file runs as a command.
_A = _B = _CONFIG = _HEIGHT = _WIDTH = _BATCH = _INSTANCES = _NUM_CLASSES = None
_ROUNDS = _STEPS = _CHILD = _ENV_A = _ENV_B = None


def define_flags() -> None:
    global _A, _B, _CONFIG, _HEIGHT, _WIDTH, _BATCH, _INSTANCES, _NUM_CLASSES
    global _ROUNDS, _STEPS, _CHILD, _ENV_A, _ENV_B
    _A = flags.DEFINE_string('a', None, 'Source tree A (a checkout or `git archive` of it).')
    _B = flags.DEFINE_string('b', None, 'Source tree B.')
    _CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file, '
                                              'relative to each tree.')
    _HEIGHT = flags.DEFINE_integer('height', 512, 'Image height (valid pixels).')
    _WIDTH = flags.DEFINE_integer('width', 512, 'Image width (valid pixels).')
    _BATCH = flags.DEFINE_integer('batch', 2, 'Images per step.')
    _INSTANCES = flags.DEFINE_integer('instances', 3, 'Ground-truth instances per image.')
    _NUM_CLASSES = flags.DEFINE_integer('num_classes', 80, 'Foreground classes.')
    _ROUNDS = flags.DEFINE_integer('rounds', 6, 'Turns each side gets.')
    _STEPS = flags.DEFINE_integer('steps_per_round', 2, 'Timed steps per turn.')
    _CHILD = flags.DEFINE_string('child', None, 'Internal: run as the child for this tree.')
    _ENV_A = flags.DEFINE_multi_string(
        'env_a', [], 'NAME=value for side A only, repeatable, e.g. DETECTAX_CPU_KERNELS=matmul '
        '(with --a=. --b=. it times one switch).')
    _ENV_B = flags.DEFINE_multi_string('env_b', [], 'NAME=value for side B only, repeatable.')


def _child() -> None:
    """Compiles the train step of the tree that is first on sys.path (see __main__),
    then runs the steps the parent asks for."""
    import functools  # pylint: disable=g-import-not-at-top
    import jax
    from benchmarks import benchmark
    from projects.maskrcnn import trainer
    config = _CONFIG.value
    stride = 2 ** (len(config.model.anchors.sizes) + 1)
    padded = benchmark.padded_size(_HEIGHT.value, _WIDTH.value, stride)
    config.dataset_configs.image_size = padded
    meta = {'num_classes': _NUM_CLASSES.value, 'input_shape': (-1, *padded, 3),
            'max_instances': config.dataset_configs.get('max_instances', 100),
            'gt_mask_size': config.dataset_configs.get('gt_mask_size', 28)}
    batch = benchmark.synthetic_batch(config, _BATCH.value, _HEIGHT.value, _WIDTH.value,
                                      padded, _INSTANCES.value, _NUM_CLASSES.value)
    model, tx, state = benchmark.build_state(config, meta)
    step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx),
                   donate_argnums=(0,)).lower(state, batch).compile()
    state, metrics = step(state, batch)   # warm-up
    jax.block_until_ready((state, metrics))
    print(json.dumps({'ready': trainer.__file__}), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        print(json.dumps({'times': times, 'loss': float(metrics['total_loss'])}), flush=True)


def side_env(base: dict, settings: list[str], flag: str) -> dict:
    """`base` with the NAME=value `settings` of --env_a or --env_b applied."""
    env = dict(base)
    for setting in settings:
        name, sep, value = setting.partition('=')
        if not sep or not name:
            raise app.UsageError(f'--{flag}: {setting!r} is not NAME=value')
        env[name] = value
    return env


def step_flags(argv: list[str]) -> list[str]:
    """The arguments that describe the step (config and its overrides, sizes),
    which go to both children unchanged."""
    return [a for a in argv if a.split('=')[0].lstrip('-').split('.')[0] in _STEP_FLAGS]


_STEP_FLAGS = ('config', 'height', 'width', 'batch', 'instances', 'num_classes')


class _Side:
    """One child process, and what it reported."""

    def __init__(self, name: str, tree: str, forwarded: list[str], env: dict):
        self.name, self.tree = name, os.path.abspath(tree)
        if not os.path.isdir(os.path.join(self.tree, 'projects', 'maskrcnn')):
            raise app.UsageError(f'--{name.lower()}={tree}: no projects/maskrcnn there')
        self.log = tempfile.TemporaryFile('w+')   # the child's stderr, for its errors
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f'--child={self.tree}', *forwarded],
            cwd=self.tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True)
        self.times, self.loss = [], None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise RuntimeError(f'side {self.name} ({self.tree}) exited '
                               f'({self.proc.wait()}):\n{tail}')
        return json.loads(line)

    def wait_ready(self) -> None:
        imported = self._read()['ready']
        if not imported.startswith(self.tree + os.sep):
            raise RuntimeError(f'side {self.name} imported the project from {imported}, '
                               f'not from {self.tree}')

    def run(self, steps: int) -> None:
        self.proc.stdin.write(f'{steps}\n')
        self.proc.stdin.flush()
        out = self._read()
        self.times += out['times']
        self.loss = out['loss']

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def main(argv) -> None:
    del argv
    if _CHILD.value:
        _child()
        return
    if not (_A.value and _B.value and _CONFIG.value is not None):
        raise app.UsageError('--a, --b and --config are required')
    forwarded = step_flags(sys.argv[1:])
    from projects.maskrcnn.kernels import host_memory  # pylint: disable=g-import-not-at-top
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    if tunables := host_memory.glibc_tunables():
        env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES'), tunables]))
    sides = [_Side('A', _A.value, forwarded, side_env(env, _ENV_A.value, 'env_a')),
             _Side('B', _B.value, forwarded, side_env(env, _ENV_B.value, 'env_b'))]
    try:
        for side in sides:
            side.wait_ready()
        for r in range(_ROUNDS.value):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                side.run(_STEPS.value)
    finally:
        for side in sides:
            side.close()
    a, b = sides
    print('command: python -m benchmarks.ab_train_step ' + ' '.join(sys.argv[1:]))
    for side in sides:
        print(f'{side.name} {side.tree}: median {statistics.median(side.times):.3f} s, '
              f'min {min(side.times):.3f} s, final loss {side.loss:.6g}; steps (s): '
              + ', '.join(f'{t:.3g}' for t in side.times))
    print(f'A / B: median {statistics.median(a.times) / statistics.median(b.times):.3f}, '
          f'min {min(a.times) / min(b.times):.3f} (above 1: B faster)')


if __name__ == '__main__':
    # A child imports the project from its tree, and so does its config file, which
    # flag parsing loads: the tree goes first on the path before anything is parsed.
    for _arg in sys.argv[1:]:
        if _arg.startswith('--child='):
            sys.path.insert(0, _arg.split('=', 1)[1])
    define_flags()
    app.run(main)
