"""The command line: main.py through the in-project runtime and through Scenic."""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'projects', 'maskrcnn', 'main.py')
TINY = os.path.join(REPO, 'tests', 'tiny_shapes_config.py')


def _scenic_importable() -> bool:
    try:
        return importlib.util.find_spec('scenic.train_lib') is not None
    except ImportError:
        return False


def _main(*args, env=None, timeout=600):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def test_unknown_config_key_on_the_command_line_is_named(tmp_path):
    result = _main(f'--config={TINY}', f'--workdir={tmp_path}', '--config.modle.depth=18')
    assert result.returncode != 0
    assert 'modle' in result.stderr


def test_misspelt_key_in_a_config_file_is_named(tmp_path):
    config = tmp_path / 'bad.py'
    config.write_text('from tests import tiny_shapes_config\n'
                      'def get_config():\n'
                      '    c = tiny_shapes_config.get_config()\n'
                      '    c.model.backbone.detph = 18\n'
                      '    return c\n')
    result = _main(f'--config={config}', f'--workdir={tmp_path / "w"}',
                   f'--config.dataset_configs.data_dir={tmp_path / "tfds"}',
                   env={'PYTHONPATH': REPO})
    assert result.returncode != 0
    assert 'model.backbone.detph' in result.stderr


@pytest.mark.skipif(not _scenic_importable(),
                    reason='Scenic (scenic.train_lib) is not importable; see BUILD_NOTES.md')
def test_main_runs_through_scenic(tmp_path):
    from scenic.model_lib.base_models import base_model  # pylint: disable=g-import-not-at-top
    from projects.maskrcnn.model import MaskRCNNModel  # pylint: disable=g-import-not-at-top
    assert issubclass(MaskRCNNModel, base_model.BaseModel)
    workdir = tmp_path / 'run'
    result = _main(f'--config={TINY}', f'--workdir={workdir}',
                   f'--config.dataset_configs.data_dir={tmp_path / "tfds"}',
                   '--config.num_training_steps=2', '--config.log_eval_steps=2')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Detectax runtime: scenic' in result.stderr
    assert 'mask_AP' in result.stderr
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
