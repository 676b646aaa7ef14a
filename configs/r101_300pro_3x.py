"""Sparse R-CNN, ResNet-101 FPN, 300 proposals, random crop, 3x schedule (46.4 AP).

  python train.py --config configs/r101_300pro_3x.py --workdir workdirs/r101_300pro_3x \
      --config.data.coco_root=coco (as in r50_100pro_3x.py)
"""
from configs import r50_300pro_3x


def get_config():
  config = r50_300pro_3x.get_config()
  config.model.backbone.depth = 101
  return config
