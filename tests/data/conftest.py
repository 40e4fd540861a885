"""Shared tiny datasets for the data tests (built once per test session)."""

import os

import pytest

from projects.maskrcnn.data import coco_builder
from projects.maskrcnn.data import shapes

TINY_SHAPES = dict(num_train=12, num_val=5, image_size=64, seed=0, max_shapes=4)


@pytest.fixture(scope='session')
def shapes_files(tmp_path_factory):
    """{'train': (json, image_dir), 'val': ...} of a tiny shapes dataset."""
    out_dir = tmp_path_factory.mktemp('shapes_raw')
    return shapes.generate_shapes_coco(str(out_dir), **TINY_SHAPES)


@pytest.fixture(scope='session')
def shapes_builder(tmp_path_factory, shapes_files):
    """The tiny shapes dataset prepared with the COCO-format builder."""
    data_dir = tmp_path_factory.mktemp('tfds')
    builder = coco_builder.build_coco_format_dataset('tiny_shapes', shapes_files,
                                                     str(data_dir))
    assert os.path.isdir(os.path.join(str(data_dir), 'tiny_shapes', coco_builder.VERSION))
    return builder
