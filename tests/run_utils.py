"""Helpers for tests that run training in subprocesses and read TensorBoard files."""

import glob
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'projects', 'maskrcnn', 'main.py')
TINY_CONFIG = os.path.join(REPO, 'tests', 'tiny_shapes_config.py')


def scalars(workdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TensorBoard files under `workdir`; a step
    written twice (a run restarted after a crash) keeps its last value."""
    values = {}
    paths = sorted(glob.glob(os.path.join(workdir, '**', 'events.out.tfevents.*'),
                             recursive=True), key=os.path.getmtime)
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                value = tf.make_ndarray(v.tensor) if v.HasField('tensor') else v.simple_value
                # Not the config text, nor the HParams records' empty tensors.
                if np.asarray(value).dtype.kind in 'fiu' and np.size(value) == 1:
                    values.setdefault(v.tag, {})[event.step] = float(np.asarray(value))
    return values


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a training subprocess: CPU, quiet TensorFlow, and the
    test session's persistent compilation cache (so each run compiles once)."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                      'detectax_test_jax_cache'),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5',
               PYTHONPATH=REPO + os.pathsep + env.get('PYTHONPATH', ''))
    env.pop('XLA_FLAGS', None)
    env.update(extra)
    return env


def main_command(workdir: str, data_dir: str, *overrides: str) -> list[str]:
    """`main.py` on the tiny shapes config, as a user would type it."""
    return [sys.executable, MAIN, f'--config={TINY_CONFIG}', f'--workdir={workdir}',
            f'--config.dataset_configs.data_dir={data_dir}', *overrides]


def run(command: list[str], env: dict[str, str], timeout: float = 600,
        signal_on: str | None = None, sig: int = signal.SIGKILL
        ) -> tuple[int, str]:
    """Runs `command`; with `signal_on`, sends `sig` as soon as a line of its
    output contains that text. Returns the exit code and the output."""
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if signal_on and not sent and signal_on in line:
                proc.send_signal(sig)
                sent = True
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = ''.join(lines)
    if signal_on and not sent:
        raise AssertionError(f'{signal_on!r} never appeared in the output:\n{output[-3000:]}')
    return code, output


def train_in_process(config, workdir: str):
    """Runs `trainer.train_and_evaluate` as main.py does, in this process: (state, metrics)."""
    import jax  # pylint: disable=g-import-not-at-top
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    from projects.maskrcnn import main as main_lib, trainer  # pylint: disable=g-import-not-at-top
    from projects.maskrcnn.model import MaskRCNNModel  # pylint: disable=g-import-not-at-top
    writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    data_rng, rng = jax.random.split(jax.random.PRNGKey(config.rng_seed))
    dataset = main_lib.get_dataset(config, data_rng)
    try:
        return trainer.train_and_evaluate(rng=rng, config=config, model_cls=MaskRCNNModel,
                                          dataset=dataset, workdir=workdir, writer=writer)
    finally:
        writer.close()
