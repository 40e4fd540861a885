"""Mask R-CNN R50-FPN on COCO 2017 with Detectron2's 1x recipe (batch 16, 90k steps).

  python projects/maskrcnn/main.py --config=configs/maskrcnn_r50_fpn_1x_coco.py \
      --workdir=/tmp/maskrcnn_r50_fpn_1x_coco

Expected (not yet measured with Detectax): Detectron2 reaches box AP 38.6 / mask AP 35.2 on
val2017 from ImageNet-pretrained weights (convert R-50.pkl or torchvision's resnet50 with
tools/convert_checkpoint and set config.init_from.checkpoint_path). Batch 16 at lr 0.02;
for another batch scale config.lr_configs.base_learning_rate linearly. Mixed precision
(bfloat16) is on: it is meant for GPUs and TPUs; on a CPU it pays only with bfloat16
matrix units (AMX), otherwise set --config.dtype=float32 (BUILD_NOTES.md, mixed precision).

Data: put the official COCO 2017 files in one folder DIR, extracted or as the zips
(the zips are read in place):
  DIR/train2017/  or DIR/train2017.zip
  DIR/val2017/    or DIR/val2017.zip
  DIR/annotations/instances_train2017.json and instances_val2017.json
                  or DIR/annotations_trainval2017.zip
and build the TFDS dataset once (about 19 GB of images; hours on a few cores):
  python -m projects.maskrcnn.data.build_dataset --coco2017_dir=DIR \
      --data_dir=~/tensorflow_datasets
(add --download to fetch the missing zips from images.cocodataset.org into DIR first). It
lands in data_dir/coco2017/<version>, with a build report; this config finds it by name.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment_name = 'maskrcnn_r50_fpn_1x_coco'
    config.dataset_name = 'coco_format'
    config.dataset_configs.name = 'coco2017'  # prepared by build_dataset --coco2017_dir
    config.dtype = 'bfloat16'  # bfloat16 convolutions and matmuls; float32 params and losses
    return config
