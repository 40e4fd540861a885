"""The resize rule follows the weights' reference in the pipeline, predict and serving.

A 375x500 photo at shortest side 800: 500 x 800 / 375 = 1066.67 is floored to 1066
by torchvision's GeneralizedRCNNTransform and rounded to 1067 by Detectron2's
ResizeShortestEdge (int(x + 0.5)).
"""

import numpy as np
import pytest
import tensorflow as tf

from configs import (
    base,
    maskrcnn_r50_fpn_1x_detectron2_coco,
    maskrcnn_r50_fpn_torchvision_coco,
)
from projects.maskrcnn import export, predict, serving_loader
from projects.maskrcnn.data import input_pipeline, transforms

CASES = [(maskrcnn_r50_fpn_torchvision_coco, 'floor', (800, 1066)),
         (maskrcnn_r50_fpn_1x_detectron2_coco, 'round', (800, 1067)),
         (base, 'round', (800, 1067))]


def _example(image):
    h, w = image.shape[:2]
    return {'image': tf.constant(image), 'image/id': tf.constant(1, tf.int64),
            'objects': {'bbox': tf.zeros([0, 4]), 'is_crowd': tf.zeros([0], tf.bool),
                        'label': tf.zeros([0], tf.int64),
                        'mask': tf.zeros([0, h, w, 1], tf.uint8)}}


@pytest.mark.parametrize('config_module, rounding, expected', CASES)
def test_375x500_resizes_by_the_configs_rule_everywhere(config_module, rounding, expected):
    settings = predict.dataset_settings(config_module.get_config())
    assert settings['resize_rounding'] == rounding
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    padded = tuple(settings['image_size'])

    pipeline = input_pipeline.preprocess_for_eval(
        _example(image), image_size=padded, eval_min_size=settings['eval_min_size'],
        max_size=settings['max_size'], pixel_mean=settings['pixel_mean'],
        pixel_std=settings['pixel_std'], max_instances=4, gt_mask_size=8,
        channel_order=settings['channel_order'], resize_rounding=rounding)
    assert tuple(pipeline['image_size'].numpy()) == expected

    size, inputs, image_size, _ = predict.preprocess_image(image, settings, [padded])
    assert size == padded and tuple(image_size) == expected
    np.testing.assert_allclose(inputs, pipeline['image'].numpy(), atol=2e-4)

    metadata = export.preprocessing_metadata(settings)
    assert metadata['resize_rounding'] == rounding
    served, served_size, _ = serving_loader.preprocess_with_metadata(image, metadata, padded)
    assert tuple(served_size) == expected
    np.testing.assert_array_equal(served, inputs)


def test_the_rules_differ_only_in_the_fraction():
    # 12.5 shows halves going up (np.round and tf.round would give 12).
    cases = ((500, 800 / 375), (5, 2.5), (3, 1.0))
    for rounding, expected in (('floor', [1066, 12, 3]), ('round', [1067, 13, 3])):
        got = [serving_loader.resized_length(*a, rounding) for a in cases]
        assert got == expected
        tf_got = [int(transforms.resized_length(tf.constant(n), tf.constant(s, tf.float64),
                                                rounding))
                  for n, s in cases]
        assert tf_got == expected
    with pytest.raises(ValueError, match="'ceil'"):
        serving_loader.resized_length(5, 1.5, 'ceil')
    with pytest.raises(ValueError, match='resize_rounding'):
        predict.dataset_settings(_config_with(resize_rounding='nearest'))


def _config_with(**dataset_configs):
    config = maskrcnn_r50_fpn_torchvision_coco.get_config()
    config.dataset_configs.update(dataset_configs)
    return config


def test_boxes_go_back_per_axis():
    # 375x500 floored to 800x1066: x by 500/1066, y by 375/800 (torchvision's resize_boxes).
    boxes = serving_loader.boxes_to_original(np.array([[1066., 800., 533., 400.]]),
                                             (800, 1066), (375, 500))
    np.testing.assert_allclose(boxes, [[500., 375., 250., 187.5]])
