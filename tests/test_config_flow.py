"""Data flows one way: config -> data -> DatasetInfo -> model -> train / evaluate, and nothing
writes into the config once it is parsed.

Two checks: (1) statically, no module of the package or entry point assigns to an attribute
or item of a config (an ml_collections ConfigDict, by the names the code gives configs:
config, data, model, loss, train, optimizer, backbone) or calls .update / setattr on one;
configs/*.py build configs and are exempt, as is absl's override parsing (not our code).
(2) at run time, the main job trains, evaluates and draws with a FrozenConfigDict, which
raises on any write; the same run compiles its predict function once for all evaluations.
"""
import ast
import pathlib

import ml_collections
import pytest

from configs import synthetic
from sparse_rcnn_jax import experiment
from sparse_rcnn_jax import inference

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = {"config", "data", "model", "loss", "train", "optimizer", "backbone"}


def _root_name(node):
  while isinstance(node, (ast.Attribute, ast.Subscript)):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


def _config_writes(path: pathlib.Path) -> list[str]:
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Assign):
      targets = node.targets
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
      targets = [node.target]
    for target in targets:
      if (isinstance(target, (ast.Attribute, ast.Subscript))
          and _root_name(target) in CONFIG_NAMES):
        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(target)}")
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("update", "__setattr__", "__setitem__")
        and _root_name(node.func.value) in CONFIG_NAMES):
      found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
  return found


def test_no_module_writes_into_a_config():
  files = sorted((ROOT / "sparse_rcnn_jax").rglob("*.py")) + [
      ROOT / name for name in ("train.py", "eval.py", "predict.py", "export.py")]
  writes = [w for path in files for w in _config_writes(path)]
  assert not writes, writes
  # The check finds writes where there are some: the config files build configs by writing.
  assert _config_writes(ROOT / "configs" / "synthetic.py")


def test_main_job_with_a_frozen_config_compiles_predict_once(tmp_path, monkeypatch):
  config = synthetic.get_config("scratch")
  config.data.synthetic.update(root=str(tmp_path / "data"), num_train=8, num_val=4,
                               image_size=64)
  config.data.update(train_scales=(64,), max_size=64, test_scale=64, batch_size=4,
                     eval_batch_size=4)
  config.model.update(num_proposals=8, num_stages=2, hidden_dim=32, dim_feedforward=64,
                      num_heads=2, dim_dynamic=8)
  config.model.backbone.width = 8
  config.train.update(num_steps=3, eval_every=1, log_every=1, checkpoint_every=3)
  frozen = ml_collections.FrozenConfigDict(config)
  built = []

  def counting(*args, **kwargs):
    built.append(real(*args, **kwargs))
    return built[-1]
  real = inference.make_predict_fn
  monkeypatch.setattr(inference, "make_predict_fn", counting)
  metrics = experiment.train_and_evaluate(frozen, tmp_path / "work")
  assert metrics is not None and 0.0 <= metrics["AP50"] <= 1.0
  # Evaluations at steps 1, 2, 3, the final one and the pictures: one function, one program.
  assert len(built) == 1 and built[0]._cache_size() == 1
  with pytest.raises((AttributeError, TypeError, ValueError)):
    frozen.model.num_classes = 3   # the run could not have written into it either
