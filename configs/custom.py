"""Your own COCO-format dataset, on a small machine (a CPU or one GPU): start here.

  python train.py --config configs/custom.py --workdir workdirs/mine \
      --config.data.coco_root=path/to/dataset

`coco_root` is a folder in one of the usual layouts (sparse_rcnn_jax/data/layout.py):
  annotations/train.json, annotations/val.json, images/
  annotations/instances_train2017.json, ..._val2017.json, train2017/, val2017/   (COCO's names)
  train/_annotations.coco.json, valid/_annotations.coco.json beside the images  (Roboflow)
The validation split is optional. Before anything is built the whole dataset is checked
(config.data.check; `python -m sparse_rcnn_jax.data.check --config configs/custom.py
--config.data.coco_root=...` runs the check alone), and every problem is reported at once.

Three recipes:
  configs/custom.py       the default: a small head on an ImageNet backbone (EfficientNet-Lite0,
  (or :pretrained)        frozen batch norm, its weights from the pip package in
                          requirements.txt; no download), small images: minutes to an hour on a
                          CPU. configs/bccd.py is this recipe on BCCD (README, results).
  configs/custom.py:scratch  the same head on a small ResNet-18 (quarter width, group norm)
                          from scratch, images at most 384 px: for data far from photographs.
  configs/custom.py:r50   the official R-50 FPN recipe (100 proposals, 6 stages, 800 px) for one
                          GPU (batch 4, the learning rate scaled to it); give it ImageNet
                          ResNet-50 weights with --config.model.backbone.weights=PATH (a
                          torchvision .pth or an .npz of its state dict).
                          Set train.num_steps to about 12 epochs of your data (1x) or 36 (3x).
The number of classes is the dataset's; any field can be overridden on the command line.
"""
import ml_collections

from configs import r50_100pro_3x


def _small_head(config: ml_collections.ConfigDict) -> None:
  """What both small recipes share, in place: a small head, batch 4, a short schedule."""
  config.data.update(max_boxes=100, batch_size=4, eval_batch_size=8, num_workers=0,
                     read_threads=2)
  config.model.update(num_proposals=50, num_stages=3, hidden_dim=64, dim_feedforward=256,
                      num_heads=4, dim_dynamic=16)
  config.optimizer.update(base_learning_rate=5e-4, base_batch_size=8, warmup_steps=100,
                          decay_at=(0.75, 0.9))
  # A moving average of the weights (DiffusionDet's decay) is what evaluation uses; eval.py
  # --use_ema=false evaluates the trained weights. AP every 1000 steps draws the AP curve in
  # the workdir's metrics.png.
  config.train.update(log_every=25, checkpoint_every=500, eval_every=1000, ema_decay=0.999)


def _pretrained(config: ml_collections.ConfigDict) -> None:
  """The default recipe, in place: a small head on EfficientNet-Lite0's ImageNet weights.

  Chosen on BCCD by AP per CPU minute (README, results) against Lite1, Lite2 and MobileNetV2
  at equal settings: ahead of Lite1 and Lite2; MobileNetV2 was 9 % ahead, but its weights'
  package installs only with --no-deps, so it cannot come with requirements.txt. The stem and
  the first three stages frozen (freeze_at=4: their gradients are most of the backbone's cost);
  the small images and the learning rate of the scratch recipe (twice that reached AP 52.7 on
  BCCD against 53.5, and on coco128 its loss stopped falling after 400 steps). No moving
  average: the schedule is too short for one to help.
  """
  _small_head(config)
  config.data.update(train_scales=(224, 256, 288), max_size=384, test_scale=256)
  config.model.backbone = ml_collections.ConfigDict(dict(
      name="efficientnet_lite", variant=0, norm="frozen_bn", freeze_at=4, weights="imagenet"))
  config.train.update(num_steps=2500, eval_every=500, ema_decay=0.0)
  config.tta.update(**scaled_tta(config.tta, config.data.test_scale))


def _scratch(config: ml_collections.ConfigDict) -> None:
  """The small recipe from scratch, in place: ResNet-18 at quarter width with group norm."""
  _small_head(config)
  config.data.update(train_scales=(224, 256, 288), max_size=384, test_scale=256)
  config.model.backbone.update(depth=18, width=16, norm="group_norm", freeze_at=0)
  config.train.update(num_steps=5200)
  config.tta.update(**scaled_tta(config.tta, config.data.test_scale))


def scaled_tta(tta: ml_collections.ConfigDict, test_scale: int) -> dict:
  """The official test-time augmentation (configs/r50_100pro_3x.py, tested at 800) scaled to a
  recipe tested at `test_scale`: scales and size-filter bounds times test_scale / 800, rounded
  to whole pixels; the bound 10000 means no limit and stays."""
  factor = test_scale / 800

  def bound(x):
    return x if x >= 10000 else round(x * factor)

  return dict(min_sizes=tuple(round(s * factor) for s in tta.min_sizes),
              max_size=round(tta.max_size * factor),
              scale_ranges=tuple((bound(lo), bound(hi)) for lo, hi in tta.scale_ranges))


def _r50(config: ml_collections.ConfigDict) -> None:
  """The official recipe on one GPU, in place."""
  config.data.update(batch_size=4, eval_batch_size=4, num_workers=2)
  config.train.update(num_steps=90_000, checkpoint_every=2000, eval_every=10_000)


def get_config(recipe: str = "") -> ml_collections.ConfigDict:
  """`recipe`: "" (or "pretrained") for the default, "scratch" for the small model from
  scratch, "r50" for the R-50 recipe."""
  config = r50_100pro_3x.get_config()
  recipes = {"": _pretrained, "pretrained": _pretrained, "scratch": _scratch, "r50": _r50}
  if recipe not in recipes:
    raise ValueError(f"configs/custom.py:{recipe}: the recipes are 'pretrained' (the default), "
                     "'scratch' and 'r50'")
  recipes[recipe](config)
  return config
