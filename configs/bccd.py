"""Real data from scratch: BCCD blood-cell detection (RBC, WBC, platelets), trainval -> test.

  python train.py --config configs/bccd.py --workdir workdirs/bccd

configs/custom.py's small recipe with the COCO-format BCCD folder at ../shared/data/bccd
(override data.train_ann etc. to point elsewhere). No pretrained weights: a small ResNet with
group norm, from scratch. 5200 steps take about 24 minutes on 2 CPU cores (README, results).
Test-time augmentation (eval.py --tta): the official scales and size filter times 256 / 800, as
this recipe tests at 256 instead of 800 (custom.scaled_tta).
"""
from configs import custom

BCCD = "../shared/data/bccd"


def get_config():
  config = custom.get_config()
  config.data.update(train_ann=f"{BCCD}/instances_trainval.json", train_images=f"{BCCD}/JPEGImages",
                     eval_ann=f"{BCCD}/instances_test.json", eval_images=f"{BCCD}/JPEGImages")
  return config
