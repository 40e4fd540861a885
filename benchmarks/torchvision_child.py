"""torchvision's Mask R-CNN R50-FPN timed on random weights; prints one JSON line.

Run by benchmarks/benchmark.py with the torch interpreter (`--torchvision_python`).
It imports neither jax nor this project, so it runs in a venv that has only
torch and torchvision:

  python -m benchmarks.torchvision_child --height=800 --width=1216 --batch=1 \\
      --mode=inference --steps=3 --pre_nms_test=1000 --post_nms_test=1000

With `--autocast=bfloat16` (or float16) the forward passes run under
`torch.autocast`, torchvision's mixed precision, which benchmarks/benchmark.py
asks for when the Detectax config computes in that dtype; `--device=cuda`
runs on the GPU (and synchronises before reading the clock). benchmark.py runs
it with `--serve`, which times one step per request between Detectax's own steps
(benchmarks/turns.py) instead of `--warmup` and `--steps`, and with GLIBC_TUNABLES
set so that its allocator keeps freed memory as the Detectax process's does
(projects/maskrcnn/kernels/host_memory.py); each side reports its minor page faults per step.
Before the timed steps two more steps of each mode, each on a fresh copy of the
model, count its FLOPs and time its forward pass by stage (torchvision_stages.py);
after them one more counts the RoIs its heads see then; the summary gives them
under 'stages'.

The detector does the same work as Detectax's torchvision-convention config:
frozen batch norm, stem and res2 frozen (torchvision's `trainable_backbone_layers=3`,
which `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)` would replace
by trainable BatchNorm everywhere), `box_score_thresh=0` and 100 detections so the
mask head always runs on 100 boxes, and `min_size=H, max_size=W` so the image
is not resized.
"""

import argparse
import contextlib
import copy as copy_lib
import json
import os

import torch
import torchvision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import misc as misc_ops

from benchmarks import torchvision_stages, turns
from benchmarks.memory import peak_rss_mb


def build_detector(args) -> torch.nn.Module:
    backbone = resnet_fpn_backbone(backbone_name='resnet50', weights=None,
                                   norm_layer=misc_ops.FrozenBatchNorm2d, trainable_layers=3)
    return MaskRCNN(
        backbone, num_classes=args.num_classes + 1, min_size=args.height, max_size=args.width,
        box_score_thresh=0.0, box_detections_per_img=100,
        rpn_pre_nms_top_n_train=args.pre_nms_train, rpn_post_nms_top_n_train=args.post_nms_train,
        rpn_pre_nms_top_n_test=args.pre_nms_test, rpn_post_nms_top_n_test=args.post_nms_test,
        box_batch_size_per_image=args.rois_per_image)


def synthetic_targets(args, generator: torch.Generator) -> list[dict]:
    """A few boxes per image, each with a full-image mask filling its box."""
    targets = []
    for _ in range(args.batch):
        boxes, masks = [], torch.zeros(args.instances, args.height, args.width, dtype=torch.uint8)
        for i in range(args.instances):
            x0 = int(torch.randint(0, args.width // 2, (1,), generator=generator))
            y0 = int(torch.randint(0, args.height // 2, (1,), generator=generator))
            x1 = x0 + args.width // 4 + 8 * i
            y1 = y0 + args.height // 4 + 8 * i
            boxes.append([x0, y0, x1, y1])
            masks[i, y0:y1, x0:x1] = 1
        labels = torch.randint(1, args.num_classes + 1, (args.instances,), generator=generator)
        targets.append({'boxes': torch.tensor(boxes, dtype=torch.float32), 'labels': labels,
                        'masks': masks})
    return targets


def _timed(fn, warmup: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    """Step times (s) and minor page faults per step."""
    runs = [turns.timed_run(fn, _sync(device)) for _ in range(warmup + steps)][warmup:]
    return [t for t, _ in runs], sum(f for _, f in runs) / steps


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)


def precision(args, device: torch.device):
    """The forward pass's precision context: torch.autocast, or nothing for float32."""
    if args.autocast == 'none':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, args.autocast))


def inference_step(args, model, images, device):
    """One inference pass over the batch (100 detections per image)."""

    def step(phases=None):
        model.eval()
        with torch.no_grad(), precision(args, device):
            out = model(images)
        # The timed steps' work; the stage counts (`phases`) run after training
        # steps may have moved the weights, which can leave fewer boxes.
        assert phases or out[0]['masks'].shape[0] == 100, out[0]['masks'].shape
    return step


def train_step(args, model, images, targets, device):
    """One SGD step on the batch (the losses' sum, momentum 0.9, weight decay 1e-4) at
    `--lr` (default: Detectron2's 0.02 per 16 images)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else 0.02 * args.batch / 16
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)

    def step(phases=None):
        model.train()
        with precision(args, device):
            losses = model(images, targets)
            loss = sum(losses.values())
        if phases:   # the forward pass ends here (torchvision_stages.py)
            phases.mark('backward', _sync(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if phases:
            phases.mark('optimizer', _sync(device))
        opt.step()
    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--height', type=int, required=True)
    parser.add_argument('--width', type=int, required=True)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--mode', choices=('inference', 'train', 'both'), default='both')
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--num_classes', type=int, default=80)
    parser.add_argument('--instances', type=int, default=3)
    parser.add_argument('--pre_nms_train', type=int, default=2000)
    parser.add_argument('--post_nms_train', type=int, default=2000)
    parser.add_argument('--pre_nms_test', type=int, default=1000)
    parser.add_argument('--post_nms_test', type=int, default=1000)
    parser.add_argument('--rois_per_image', type=int, default=512)
    parser.add_argument('--lr', type=float, default=None,
                        help='SGD learning rate (benchmark.py passes its config\'s first-step rate)')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--autocast', choices=('none', 'bfloat16', 'float16'), default='none',
                        help='torch.autocast dtype of the forward pass (none: float32).')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--serve', action='store_true',
                        help='Run one step per request on stdin (benchmarks/turns.py) '
                             'instead of --warmup and --steps.')
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.set_num_threads(args.threads)
    # Subnormal floats flush to zero, as XLA:CPU runs Detectax's step: at the warm-up's small
    # learning rate torch's float32 training step otherwise slowed from 5.7 to 14.4 s over
    # three steps (512x512, batch 2) as subnormal values built up.
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_detector(args).to(device)
    images = [torch.rand(3, args.height, args.width, generator=generator).to(device)
              for _ in range(args.batch)]
    result = {'torch': torch.__version__, 'torchvision': torchvision.__version__,
              'threads': torch.get_num_threads(), 'autocast': args.autocast,
              'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}
    makers = {}
    if args.mode in ('inference', 'both'):
        makers['inference'] = lambda m: inference_step(args, m, images, device)
    if args.mode in ('train', 'both'):
        targets = [{k: v.to(device) for k, v in t.items()}
                   for t in synthetic_targets(args, generator)]
        makers['train'] = lambda m: train_step(args, m, images, targets, device)
    # FLOPs and stage times of each mode's first step, each on its own copy of the
    # fresh model (the count's step warms the kernels up for the timed one): the
    # timed steps' training can move the weights so far that fewer RoIs survive.
    first = {}
    for mode, make in makers.items():
        first[mode] = torchvision_stages.count_flops(make(copy := copy_lib.deepcopy(model)), copy)
        first[mode].update(torchvision_stages.time_stages(
            make(copy := copy_lib.deepcopy(model)), copy, _sync(device)))
    steps = {mode: make(model) for mode, make in makers.items()}

    def summary() -> dict:
        # The RoIs the heads see after the timed steps: one more untimed step per mode.
        for mode, step in steps.items():
            first[mode]['rois_timed'] = torchvision_stages.count_rois(step, model)
        result['stages'] = first
        if device.type == 'cuda':
            result['device_peak_bytes'] = torch.cuda.max_memory_allocated(device)
        result['peak_rss_mb'] = peak_rss_mb()
        return result

    if args.serve:
        turns.serve(steps, args.batch, summary, sync=_sync(device))
        return
    for mode, step in steps.items():
        times, faults = _timed(step, args.warmup, args.steps, device)
        result[mode] = turns.step_stats(mode, args.batch, times, faults)
    print(json.dumps(summary()))


if __name__ == '__main__':
    main()
