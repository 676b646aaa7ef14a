"""The main job: a small Sparse R-CNN on EfficientNet-Lite0's ImageNet weights, trained on the
embedded synthetic shapes.

  python train.py --config configs/synthetic.py --workdir workdirs/synthetic
  python train.py --config configs/synthetic.py:scratch --workdir workdirs/synthetic_scratch

The dataset (sparse_rcnn_jax/data/synthetic.py) is generated on first use under
data_cache/synthetic, deterministically from its seed. Train, COCO evaluation on the held-out
split, AP table, detection pictures in the workdir: 13 minutes from a fresh clone on 2 slow CPU
cores training at 17.6 images/s (README, results). `:scratch` is the former main job: the same head on a quarter-width
ResNet-18 from scratch, which needs twice the steps for a lower AP.
"""
import ml_collections

from configs import r50_100pro_3x


def _shared(config: ml_collections.ConfigDict) -> None:
  """The data and the head, in place: what both recipes share."""
  data = config.data
  data.source = "synthetic"
  # The generator's arguments (sparse_rcnn_jax/data/synthetic.py, SyntheticConfig): size, seed
  # and difficulty of the set. A folder made with other values is refused, not overwritten.
  data.synthetic = ml_collections.ConfigDict(dict(
      root="data_cache/synthetic", num_train=800, num_val=100, image_size=160, seed=0,
      max_objects=8, empty_fraction=0.03, min_scale=0.08, max_scale=0.6, min_visible=0.5))
  data.update(train_scales=(128, 144, 160), max_size=160, test_scale=160, max_boxes=16,
              batch_size=8, eval_batch_size=20, num_workers=0, read_threads=2)
  # Within a CPU budget depth pays most (README, results): 3 stages of width 64 reached AP 14,
  # 5 stages of width 48 27, 6 stages 31.6 in 10 % more time (from scratch). RoIs pooled to 5x5
  # instead of 7x7 make steps cheap enough to pay for the sixth stage.
  config.model.update(num_proposals=50, num_stages=6, hidden_dim=48, dim_feedforward=256,
                      num_heads=4, dim_dynamic=16, pooler_resolution=5)
  config.optimizer.update(base_learning_rate=5e-4, base_batch_size=8, warmup_steps=100,
                          decay_at=(0.75, 0.9))
  config.train.update(log_every=25, checkpoint_every=500, eval_every=0)


def _pretrained(config: ml_collections.ConfigDict) -> None:
  """The default, in place: EfficientNet-Lite0 with its ImageNet weights (the pip package of
  requirements.txt), frozen batch norm, stem and first three stages frozen, 1500 steps.

  One run each on 2 CPU cores (README, results): 1500 steps reached AP 49.8 at learning rate
  5e-4, where the scratch recipe needs 3000 steps for 44.6-46.1; at 1e-3 it had AP 1.1 at step
  500 against 16.1.
  """
  _shared(config)
  config.model.backbone = ml_collections.ConfigDict(dict(
      name="efficientnet_lite", variant=0, norm="frozen_bn", freeze_at=4, weights="imagenet"))
  config.train.update(num_steps=1500)


def _scratch(config: ml_collections.ConfigDict) -> None:
  """The former main job, in place: ResNet-18 at quarter width, trainable group norm, nothing
  frozen, 3000 steps (AP 46.1 in 11 min 5 s of training on the faster machine)."""
  _shared(config)
  config.model.backbone.update(depth=18, width=16, norm="group_norm", freeze_at=0)
  config.train.update(num_steps=3000)


def get_config(recipe: str = "") -> ml_collections.ConfigDict:
  """`recipe`: "" (or "pretrained") for the main job, "scratch" for it from scratch."""
  config = r50_100pro_3x.get_config()
  recipes = {"": _pretrained, "pretrained": _pretrained, "scratch": _scratch}
  if recipe not in recipes:
    raise ValueError(f"configs/synthetic.py:{recipe}: the recipes are 'pretrained' (the "
                     "default) and 'scratch'")
  recipes[recipe](config)
  return config
