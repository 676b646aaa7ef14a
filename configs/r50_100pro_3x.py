"""Sparse R-CNN, ResNet-50 FPN, 100 proposals, 3x schedule: the official recipe (42.8 AP).

  python train.py --config configs/r50_100pro_3x.py --workdir workdirs/r50_100pro_3x \
      --config.data.coco_root=coco

with coco/ as COCO ships it (annotations/instances_{train,val}2017.json, train2017/, val2017/);
data.train_ann, data.train_images, data.eval_ann and data.eval_images name the files one by one.

Every other recipe starts from this file and overrides fields; any field can also be
overridden on the command line, e.g. --config.model.num_proposals=300.
"""
import ml_collections

from sparse_rcnn_jax.data import config as data_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Pictures only (the main job's, predict.py's): detections scoring below it are not drawn.
  config.display_threshold = 0.3

  # Model (docs/model.md, sections 2-4).
  config.model = model = ml_collections.ConfigDict()
  # The model always has the dataset's number of classes; this value is used only where there
  # is no dataset (benchmarks on random data).
  model.num_classes = 80
  model.num_proposals = 100
  model.num_stages = 6
  # Inference (evaluation, prediction, both exports) stops after this many stages: 0 = all;
  # k = the first k stages, exactly their predictions of the whole head (the paper's Table 7
  # from one trained model; eval.py --stages prints the AP of every stage). Training runs all.
  model.eval_stages = 0
  model.hidden_dim = 256
  model.dim_feedforward = 2048
  model.num_heads = 8
  model.dim_dynamic = 64
  model.num_cls_layers = 1
  model.num_reg_layers = 3
  model.pooler_resolution = 7
  model.sampling_ratio = 2
  # RoIAlign's form: "gather" (CPU, GPU), "separable" (matrix products, for TPU) or "auto"
  # (by platform); the same function either way (sparse_rcnn_jax/model/roi_align.py).
  model.roi_align_impl = "auto"
  model.canonical_box_size = 224.0  # RoI level: P4 for a box of this side (official: 224)
  model.dropout = 0.0
  model.prior_prob = 0.01
  # The paper's ablations: interaction dynamic_conv | attention (Table 8) | static (Table 4,
  # without instance interaction); self_attention (Table 4); feature_reuse (Table 3);
  # proposal_init image | center | grid | random (Table 5).
  model.interaction = "dynamic_conv"
  model.self_attention = True
  model.feature_reuse = True
  model.proposal_init = "image"
  # The backbone, by name (sparse_rcnn_jax/model/backbones/); the other fields are its own, but for
  # `weights`, which every backbone takes: "" (random initialization), "imagenet" (the file of
  # a pip package, where one exists) or the path of a weights file (for the ResNet:
  # torchvision's ImageNet file, e.g. resnet50-0676ba61.pth).
  model.backbone = ml_collections.ConfigDict(
      dict(name="resnet", depth=50, width=64, norm="frozen_bn", freeze_at=2, weights=""))
  # Gradients of the backbone's and FPN's convolutions: "matmul_grad" (as matrix products,
  # several times faster on a CPU), "xla" (XLA's own, for GPU/TPU), "auto" (by platform).
  model.conv_impl = "auto"
  # Compute dtype: "float32", or "bfloat16" for GPU/TPU (parameters, losses, matching, box
  # decoding and RoIAlign's coordinates stay float32; sparse_rcnn_jax/model/precision.py).
  model.dtype = "float32"
  # A whole model to start from, after the backbone's weights: the workdir of an earlier run
  # (its newest checkpoint, its moving average of the weights if it kept one) or an official
  # Sparse R-CNN checkpoint (.pth/.npz), of which every tensor whose name and shape fit is
  # loaded and the rest (e.g. the class layers for another number of classes) keeps its
  # initialization (sparse_rcnn_jax/training/init_from.py).
  model.init_from = ""

  # Data (docs/model.md, section 1; fields documented in sparse_rcnn_jax/data/config.py).
  config.data = data_config.default_config()

  # Loss and matching (docs/model.md, section 5). matcher: "scipy" (exact, on the host through one
  # callback per device; the default) or "device" (on the accelerator, no host round trip: for
  # GPU/TPU pods; sparse_rcnn_jax/training/matcher.py says when to choose which).
  config.loss = ml_collections.ConfigDict(dict(
      class_weight=2.0, l1_weight=5.0, giou_weight=2.0, focal_alpha=0.25, focal_gamma=2.0,
      matcher="scipy"))

  # Optimizer and schedule (docs/model.md, section 7); the lr scales with data.batch_size.
  config.optimizer = ml_collections.ConfigDict(dict(
      base_learning_rate=2.5e-5, base_batch_size=16, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=1e-4, clip_norm=1.0, warmup_steps=1000, warmup_factor=0.01,
      decay_at=(210_000 / 270_000, 250_000 / 270_000), decay_factor=0.1,
      backbone_multiplier=1.0))

  # ema_decay: a moving average of the parameters, evaluated instead of them (0: off, as the
  # official recipe; DiffusionDet's value is 0.999), with an optional warm-up of
  # ema_warmup_steps (decay * (1 - exp(-step / warmup)); 0: none). sparse_rcnn_jax/training/ema.py.
  config.train = ml_collections.ConfigDict(dict(
      num_steps=270_000, log_every=20, checkpoint_every=5000,
      keep_checkpoints=3, eval_every=0, max_nonfinite_in_a_row=20,
      ema_decay=0.0, ema_warmup_steps=0))

  # Test-time augmentation, `eval.py --tta` (sparse_rcnn_jax/evaluation/tta.py; docs/model.md, section 10):
  # the official TEST.AUG settings. Each short side of min_sizes (long side at most max_size),
  # plain and, with flip, mirrored; scale_ranges: one (lo, hi) per short side, boxes kept only
  # if lo^2 < area < hi^2 in the augmented image's pixels (() for no filter); boxes of one
  # class with IoU >= vote_iou are merged by soft voting; max_detections per image (0: the
  # number of proposals).
  config.tta = ml_collections.ConfigDict(dict(
      min_sizes=(400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800, 800),
      max_size=4000, flip=True,
      scale_ranges=((96, 10000), (96, 10000), (64, 10000), (64, 10000), (64, 10000),
                    (0, 10000), (0, 10000), (0, 256), (0, 256), (0, 192), (0, 192), (0, 96),
                    (0, 10000)),
      vote_iou=0.65, max_detections=0))
  return config
