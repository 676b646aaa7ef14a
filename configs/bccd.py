"""Real data: BCCD blood-cell detection (RBC, WBC, platelets), trainval -> test.

  python train.py --config configs/bccd.py --workdir workdirs/bccd
  python train.py --config configs/bccd.py:scratch --workdir workdirs/bccd_scratch

configs/custom.py's recipes with the COCO-format BCCD folder at ../shared/data/bccd (override
data.train_ann etc. to point elsewhere): by default its pretrained recipe (EfficientNet-Lite0's
ImageNet weights, 2500 steps); `:scratch` its small ResNet from scratch (5200 steps). README,
results, gives both runs and their times on 2 CPU cores.
Test-time augmentation (eval.py --tta): the official scales and size filter times
test_scale / 800, as these recipes test at 256 instead of 800 (custom.scaled_tta).
"""
from configs import custom

BCCD = "../shared/data/bccd"


def get_config(recipe: str = ""):
  """`recipe`: one of configs/custom.py's ("" for its default)."""
  config = custom.get_config(recipe)
  config.data.update(train_ann=f"{BCCD}/instances_trainval.json", train_images=f"{BCCD}/JPEGImages",
                     eval_ann=f"{BCCD}/instances_test.json", eval_images=f"{BCCD}/JPEGImages")
  return config
