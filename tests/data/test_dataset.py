"""End-to-end tests of the Scenic-style dataset builders."""

import os

import numpy as np
import pytest

from projects.maskrcnn.data import dataset

TINY_CONFIGS = dict(num_train=10, num_val=3, shapes_image_size=48, shapes_seed=1,
                    max_shapes=3, image_size=(48, 48), train_min_sizes=(40, 48),
                    max_size=48, eval_min_size=48, max_instances=4, gt_mask_size=12,
                    shuffle_buffer_size=8)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('data_dir'))


def _get(data_dir, **overrides):
    configs = dict(TINY_CONFIGS, data_dir=data_dir, **overrides)
    return dataset.get_dataset('shapes', batch_size=4, eval_batch_size=2, num_shards=1,
                               shuffle_seed=0, dataset_configs=configs)


def test_shapes_end_to_end(data_dir):
    ds = _get(data_dir)
    assert ds.test_iter is None
    meta = ds.meta_data
    assert meta['num_classes'] == 3
    assert meta['category_ids'] == [1, 2, 3]
    assert meta['category_names'] == ['circle', 'rectangle', 'triangle']
    assert meta['input_shape'] == (-1, 48, 48, 3)
    assert (meta['num_train_examples'], meta['num_eval_examples']) == (10, 3)
    assert (meta['max_instances'], meta['gt_mask_size']) == (4, 12)
    assert os.path.exists(meta['val_annotations_file'])
    assert meta['val_annotations_file'].startswith(data_dir)

    batch = next(ds.train_iter)
    assert isinstance(batch['image'], np.ndarray)
    assert batch['image'].shape == (4, 48, 48, 3) and batch['gt_masks'].shape == (4, 4, 12, 12)
    for _ in range(2):  # valid_iter makes a fresh full pass on every call
        batches = list(ds.valid_iter())
        assert [b['batch_mask'].tolist() for b in batches] == [[1, 1], [1, 0]]
        assert [b['image_id'].tolist() for b in batches] == [[1, 2], [3, 0]]


def test_unknown_config_key_is_an_error(data_dir):
    with pytest.raises(ValueError, match='num_trian'):
        _get(data_dir, num_trian=5)
    with pytest.raises(ValueError, match=r"\['val_annotations', 'val_images'\]"):
        dataset.get_dataset('coco_format', batch_size=2, eval_batch_size=2, num_shards=1,
                            dataset_configs={'data_dir': data_dir, 'train_annotations': 'a',
                                             'train_images': 'b'})
    # No paths: the dataset must be prepared under its name; the error says how.
    with pytest.raises(FileNotFoundError, match='build_dataset --name=coco2017'):
        dataset.get_dataset('coco_format', batch_size=2, eval_batch_size=2, num_shards=1,
                            dataset_configs={'data_dir': data_dir})
    with pytest.raises(ValueError, match='channel_order'):
        _get(data_dir, channel_order='RBG')
    with pytest.raises(ValueError, match='not divisible'):
        dataset.get_dataset('shapes', batch_size=3, eval_batch_size=2, num_shards=2,
                            dataset_configs=dict(TINY_CONFIGS, data_dir=data_dir))


def test_unknown_dataset_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"'nope'.*coco_format.*shapes"):
        dataset.get_dataset_builder('nope')
    assert dataset.get_dataset_builder('shapes') is dataset.get_shapes_dataset


def test_train_iterator_save_and_restore_continue_the_stream(data_dir, tmp_path):
    uninterrupted = _get(data_dir).train_iter
    expected = [next(uninterrupted) for _ in range(5)]

    first = _get(data_dir).train_iter
    for _ in range(3):
        next(first)
    checkpoint = str(tmp_path / 'data_ckpt')
    first.save(checkpoint)

    resumed = _get(data_dir).train_iter
    assert not np.array_equal(next(resumed)['image'], expected[3]['image'])  # fresh start
    resumed.restore(checkpoint)
    for want in expected[3:]:
        got = next(resumed)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_large_scale_jitter_and_bgr_from_dataset_configs(data_dir):
    ds = _get(data_dir, large_scale_jitter=True, lsj_scale_range=(1.5, 2.0),
              channel_order='BGR', pixel_mean=(103.53, 116.28, 123.675),
              pixel_std=(1.0, 1.0, 1.0))
    batch = next(ds.train_iter)
    assert batch['image'].shape == (4, 48, 48, 3)
    # Scaled to 1.5-2x the padded size and cropped: every image fills the padded size.
    assert (batch['image_size'] == 48).all()
    assert (batch['image_scale'] >= 1.5 - 1e-6).all() and batch['gt_has_mask'].dtype == bool
    # Unscaled BGR pixels minus the MSRA mean stay within -124..152.
    assert batch['image'].min() >= -124 and batch['image'].max() <= 152
