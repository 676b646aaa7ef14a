"""Sparse R-CNN, ResNet-101 FPN, 100 proposals, 3x schedule (44.1 AP).

  python train.py --config configs/r101_100pro_3x.py --workdir workdirs/r101_100pro_3x \
      --config.data.coco_root=coco (as in r50_100pro_3x.py)
"""
from configs import r50_100pro_3x


def get_config():
  config = r50_100pro_3x.get_config()
  config.model.backbone.depth = 101
  return config
