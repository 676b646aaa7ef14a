"""A tiny Sparse R-CNN for CPU runs and tests: ResNet-18 at 1/4 width, 2 stages, 10 proposals.

  python train.py --config configs/tiny.py --workdir workdirs/tiny
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
  config.train.update(batch_size=2, num_steps=20, log_every=1, checkpoint_every=10)
  config.optimizer.update(base_learning_rate=1e-4, base_batch_size=2, warmup_steps=5)
  return config
