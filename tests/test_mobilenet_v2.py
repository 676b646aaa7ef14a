"""MobileNetV2 against torchvision's definition with the pip package's ImageNet weights, on real
photos: every returned level to float32 rounding and the same ImageNet top-5.

torchvision itself does not import beside the CPU build of torch the tests use, so its
MobileNetV2 is restated below in torch.nn, module for module (`features.N.conv.K`, ConvBNReLU6
as Sequential(conv, bn, relu6), `classifier.1`); `load_state_dict(strict=True)` of torchvision's
file proves the names and shapes are torchvision's.
"""
import jax
import numpy as np
import pytest

from sparse_rcnn_jax.model.backbones import mobilenet_v2
from sparse_rcnn_jax.model.backbones import weights as weights_lib
from sparse_rcnn_jax.model.backbones.inverted_residual import Classifier
from sparse_rcnn_jax.model.backbones.mobilenet_v2 import MobileNetV2
from photos import assert_close, photos

torch = pytest.importorskip("torch")
nn = torch.nn

# torchvision's inverted_residual_setting: (t, c, n, s).
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))
# Levels 2..5: the outputs of features[3], [6], [13] and [17].
LEVEL_FEATURES = {2: 3, 3: 6, 4: 13, 5: 17}


def conv_bn_relu6(inp, oup, kernel=3, stride=1, groups=1):
  return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups,
                                 bias=False), nn.BatchNorm2d(oup), nn.ReLU6())


class InvertedResidual(nn.Module):

  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    hidden = inp * expand_ratio
    self.use_res_connect = stride == 1 and inp == oup
    layers = [conv_bn_relu6(inp, hidden, kernel=1)] if expand_ratio != 1 else []
    layers += [conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
               nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TorchMobileNetV2(nn.Module):

  def __init__(self):
    super().__init__()
    features, inp = [conv_bn_relu6(3, 32, stride=2)], 32
    for t, c, n, s in SETTING:
      for i in range(n):
        features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
        inp = c
    features.append(conv_bn_relu6(inp, 1280, kernel=1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

  def levels_and_logits(self, x: np.ndarray):
    with torch.no_grad():
      h = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
      levels = {}
      for index, layer in enumerate(self.features):
        h = layer(h)
        for level, i in LEVEL_FEATURES.items():
          if i == index:
            levels[level] = h.numpy().transpose(0, 2, 3, 1)
      logits = self.classifier(h.mean((2, 3))).numpy()
    return levels, logits


@pytest.fixture(scope="module")
def imagenet():
  try:
    path = weights_lib.locate(mobilenet_v2.IMAGENET_FILE, "test")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model = TorchMobileNetV2()
  model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
  return model.eval(), MobileNetV2().load_weights("imagenet")


def test_imagenet_weights_equal_torchvisions_model(imagenet, data_dir):
  model, variables = imagenet
  net = MobileNetV2()
  mean, std = np.float32(net.pixel_mean), np.float32(net.pixel_std)
  for size in ((224, 224), (256, 352), (97, 131)):  # the last: odd sizes at every level
    x = (photos(data_dir, size) - mean) / std
    expected, expected_logits = model.levels_and_logits(x)
    features = jax.jit(net.apply)({"params": variables["params"],
                                   "batch_stats": variables["batch_stats"]}, x)
    for level in (2, 3, 4, 5):
      assert features[level].shape == expected[level].shape, (size, level)
      assert_close(np.asarray(features[level]), expected[level])
    logits = np.asarray(Classifier(net.spec).apply(variables["classifier"], features[5]))
    assert_close(logits, expected_logits)
    if size == (224, 224):
      np.testing.assert_array_equal(np.argsort(-logits, 1)[:, :5],
                                    np.argsort(-expected_logits, 1)[:, :5])


def test_every_tensor_of_the_file_is_used_or_named(imagenet):
  model, variables = imagenet
  table = mobilenet_v2.torch_table()
  assert list(table) == list(model.state_dict())
  assert all(name.endswith("num_batches_tracked")
             for name, entry in table.items() if entry.path is None)
  values = sum(np.size(v) for v in jax.tree.leaves(variables))
  assert values == sum(v.numel() for k, v in model.state_dict().items()
                       if not k.endswith("tracked"))
