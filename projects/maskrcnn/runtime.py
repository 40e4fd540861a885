"""In-project stand-in for `scenic.app`, with the same contract.

Flags `--config` (an ml_collections config file; `--config.key=value`
overrides any field) and `--workdir`; `run(main)` calls
`main(rng=PRNGKey(config.rng_seed), config=, workdir=, writer=)` with a clu
metric writer that writes TensorBoard event files into the workdir.
"""

import functools
import os
import sys

from absl import app, flags, logging
from clu import metric_writers
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard files and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(main) -> None:
    app.run(functools.partial(_run_main, main=main), flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a one-line error for an override of a key the config lacks
    (ml_collections raises a bare AttributeError naming only the last part of it)."""
    try:
        return app.parse_flags_with_usage(argv)
    except AttributeError as e:
        key = str(e).strip('"\'')
        flag = next((a.split('=')[0] for a in argv if a.startswith('--config.') and
                     f'.{key}.' in a.split('=')[0] + '.'), f'--config.(...).{key}')
        hint = ''
        if flag == '--config.dataset_configs.name':
            hint = (' To train this config on a dataset prepared with build_dataset --name=NAME, '
                    'write --config=configs/demo_shapes.py:NAME (the demo config) or set '
                    "config.dataset_name = 'coco_format' and config.dataset_configs.name = "
                    "'NAME' in a config file based on configs/base.py.")
        elif flag.startswith('--config.model.fpn.'):
            hint = (f' The FPN settings moved to model.neck: write '
                    f'--config.model.neck.{flag[len("--config.model.fpn."):]}=...')
        sys.exit(f'FATAL Flags parsing error: {flag}: the config has no key {key!r} on '
                 f'this path, so it cannot be set from the command line.{hint}')


def _run_main(argv, *, main) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    # TensorFlow only feeds data here: keep it off any accelerator JAX uses.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
    config = FLAGS.config
    workdir = FLAGS.workdir
    if 'workdir_suffix' in config and config.workdir_suffix:
        workdir = os.path.join(workdir, config.workdir_suffix)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise app.UsageError(f'--workdir={workdir} is a file, not a directory: give a new or '
                             f'existing directory.')
    logging.info('JAX process %d / %d, devices: %r', jax.process_index(),
                 jax.process_count(), jax.devices())
    rng = jax.random.PRNGKey(config.rng_seed)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    main(rng=rng, config=config, workdir=workdir, writer=writer)
