"""Sparse R-CNN, ResNet-50 FPN, 300 proposals, random crop, 3x schedule (45.0 AP).

  python train.py --config configs/r50_300pro_3x.py --workdir workdirs/r50_300pro_3x \
      --config.data.coco_root=coco (as in r50_100pro_3x.py)
"""
from configs import r50_100pro_3x


def get_config():
  config = r50_100pro_3x.get_config()
  config.model.num_proposals = 300
  config.data.crop = True
  return config
