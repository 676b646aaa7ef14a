"""A tiny Sparse R-CNN for CPU runs and tests: ResNet-18 at 1/4 width, 2 stages, 10 proposals.

  python train.py --config configs/tiny.py --workdir workdirs/tiny \
      --config.data.train_ann=ANN.json --config.data.train_images=IMAGES/
"""
from configs import r50_100pro_3x


def get_config():
  config = r50_100pro_3x.get_config()
  model = config.model
  model.num_proposals = 10
  model.num_stages = 2
  model.hidden_dim = 32
  model.dim_feedforward = 64
  model.num_heads = 2
  model.dim_dynamic = 8
  # From scratch (no pretrained weights): trainable group norm, nothing frozen.
  model.backbone.update(depth=18, width=16, norm="group_norm", freeze_at=0)
  config.data.update(train_scales=(96, 128), max_size=160, test_scale=128, max_boxes=20,
                     batch_size=2, eval_batch_size=2, num_workers=0, read_threads=1)
  config.train.update(num_steps=20, log_every=1, checkpoint_every=10)
  config.optimizer.update(base_learning_rate=1e-4, base_batch_size=2, warmup_steps=5)
  return config
