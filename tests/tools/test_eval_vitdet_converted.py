"""MAE and Detectron2 ViTDet weights convert, load through init_from and evaluate
through main.py --config.eval_only=True on a tiny ViTDet (tests/tiny_vitdet_config.py)."""

import os
import re

import numpy as np

from projects.maskrcnn.tools import convert_checkpoint as cc
from tests import run_utils
from tests.tools.test_vitdet_parity import GOLDEN_DIR, _heads, _write_pkl

TINY_VITDET = os.path.join(run_utils.REPO, 'tests', 'tiny_vitdet_config.py')


def _eval(tmp_path, converted, *overrides):
    workdir = str(tmp_path / 'eval')
    command = [*run_utils.main_command(workdir, str(tmp_path / 'tfds'), *overrides,
                                       '--config.eval_only=True',
                                       f'--config.init_from.checkpoint_path={converted}')]
    command[2] = f'--config={TINY_VITDET}'
    code, output = run_utils.run(command, run_utils.subprocess_env())
    assert code == 0, output[-3000:]
    loaded = re.search(r"loaded (\d+) of the model's (\d+) arrays", output)
    assert loaded, output[-3000:]
    assert 'eval_only: evaluating the parameters of step 0' in output
    scalars = run_utils.scalars(workdir)
    assert 0 in scalars['valid/mask_AP'] and 0 in scalars['valid/box_AP']
    return int(loaded.group(1)), int(loaded.group(2)), output


def test_detectron2_vitdet_pickle_evaluates_through_main(tmp_path, capsys):
    trunk, _ = cc.read_source(str(GOLDEN_DIR / 'vitdet_tiny.pth'), 'detectron2')
    # Heads of 2 classes: the shapes data has 3, so the class outputs cannot fit.
    path = tmp_path / 'model_final_vitdet.pkl'
    _write_pkl(path, {**trunk, **_heads(np.random.default_rng(0), classes=2)})
    converted = str(tmp_path / 'converted')
    assert cc.main(['--source=detectron2', str(path), converted]) == 0
    assert 'unused' not in capsys.readouterr().out
    loaded, total, output = _eval(tmp_path, converted)
    # Everything but the class-dependent outputs (box scores, box deltas, mask
    # predictor: kernel and bias each) comes from the file, and those are listed.
    assert total - loaded == 6, (loaded, total)
    misfits = re.search(r'init_from: 6 arrays have another shape.*', output)
    assert misfits, output[-3000:]
    for name in ('cls_score/kernel', 'bbox_pred/bias', 'mask_predictor/predictor/kernel'):
        assert name in misfits.group(0)


def test_mae_pretraining_file_initialises_the_trunk_through_main(tmp_path, capsys):
    converted = str(tmp_path / 'mae')
    assert cc.main(['--source=mae', str(GOLDEN_DIR / 'vit_mae_tiny.pth'), converted]) == 0
    assert 'dropped (no place in ViTDet): cls_token, norm.bias, norm.weight' in \
        capsys.readouterr().out
    loaded, total, output = _eval(
        tmp_path, converted, '--config.model.backbone.width=16',
        '--config.model.backbone.depth=2', '--config.model.backbone.global_blocks=(1,)')
    # The trunk's 27 arrays (MAE's 30 less cls_token and norm.*); the rel-pos
    # tables, pyramid and heads keep their initial values and are listed.
    assert loaded == 27, (loaded, total)
    missing = re.search(r'init_from: (\d+) arrays are not in the checkpoint.*', output)
    assert missing and int(missing.group(1)) == total - 27, output[-3000:]
    assert 'params/body/blocks_1/attn/rel_pos_h' in missing.group(0)
    assert 'params/neck/simfp_2_0/kernel' in missing.group(0)
