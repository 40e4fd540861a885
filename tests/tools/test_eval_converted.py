"""A converted checkpoint evaluates through main.py with --config.eval_only=True."""

import os
import pathlib
import re

from projects.maskrcnn.tools import convert_checkpoint
from tests import run_utils

TINY_PTH = pathlib.Path(__file__).parent / 'golden' / 'torchvision_tiny_maskrcnn.pth'
# The tiny torchvision model's architecture (see test_convert_checkpoint.py); its
# 2-class heads do not fit the 3 shapes classes and must be skipped, not loaded.
TINY_MODEL = ('--config.model.backbone.depth=50', '--config.model.backbone.width=1',
              '--config.model.backbone.norm=frozen_bn', '--config.model.neck.channels=4',
              '--config.model.box_head.fc_dim=8', '--config.model.mask_head.conv_dim=4',
              '--config.model.mask_head.num_convs=4')


def test_converted_torchvision_checkpoint_evaluates_through_main(tmp_path):
    converted = str(tmp_path / 'converted')
    assert convert_checkpoint.main(['--source=torchvision', str(TINY_PTH), converted]) == 0
    workdir = str(tmp_path / 'eval')
    command = run_utils.main_command(
        workdir, str(tmp_path / 'tfds'), *TINY_MODEL, '--config.eval_only=True',
        f'--config.init_from.checkpoint_path={converted}')
    code, output = run_utils.run(command, run_utils.subprocess_env())
    assert code == 0, output[-3000:]
    loaded = re.search(r"loaded (\d+) of the model's (\d+) arrays", output)
    assert loaded, output[-3000:]
    # Everything but the class-dependent head outputs comes from the checkpoint.
    assert int(loaded.group(2)) - int(loaded.group(1)) <= 6, loaded.group(0)
    assert 'another shape in the checkpoint' in output and 'cls_score' in output
    assert 'eval_only: evaluating the parameters of step 0' in output
    scalars = run_utils.scalars(workdir)
    assert 0 in scalars['valid/mask_AP'] and 0 in scalars['valid/box_AP']
    assert not any(tag.startswith('train/') for tag in scalars), sorted(scalars)
    assert os.path.exists(os.path.join(workdir, 'coco_results.json'))
    assert not os.path.exists(os.path.join(workdir, 'checkpoints', '1'))
