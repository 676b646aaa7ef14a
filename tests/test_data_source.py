"""Image decoding: every colour mode to uint8 RGB, EXIF orientation, and unreadable files."""
import io

import numpy as np
from PIL import Image
import pytest

from sparse_rcnn_jax.data import source as source_lib


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  img.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _palette_image(transparent: bool) -> Image.Image:
  img = Image.new("P", (4, 3), 1)
  img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
  if transparent:
    img.info["transparency"] = 0
  return img


MODES = [
    ("grey", _encode(Image.new("L", (4, 3), 100), "PNG"), (100, 100, 100)),
    ("grey+alpha", _encode(Image.new("LA", (4, 3), (90, 0)), "PNG"), (90, 90, 90)),
    ("palette", _encode(_palette_image(False), "PNG"), (200, 100, 50)),
    ("palette+transparency", _encode(_palette_image(True), "PNG"), (200, 100, 50)),
    ("rgba", _encode(Image.new("RGBA", (4, 3), (10, 20, 30, 0)), "PNG"), (10, 20, 30)),
    ("cmyk white", _encode(Image.new("CMYK", (4, 3), (0, 0, 0, 0)), "JPEG", quality=100),
     (255, 255, 255)),
    ("16-bit grey", _encode(Image.fromarray(np.full((3, 4), 257 * 70, np.uint16)), "PNG"),
     (70, 70, 70)),
    ("1-bit", _encode(Image.new("1", (4, 3), 1), "PNG"), (255, 255, 255)),
]


@pytest.mark.parametrize("data,expected", [m[1:] for m in MODES], ids=[m[0] for m in MODES])
def test_every_mode_becomes_8_bit_rgb(data, expected):
  image = source_lib.decode_image(data)
  assert image.dtype == np.uint8 and image.shape == (3, 4, 3)
  np.testing.assert_allclose(image.reshape(-1, 3), np.tile(expected, (12, 1)), atol=2)


def test_exif_orientation_is_applied(tmp_path):
  """Orientation 6 (displayed = raw turned 90 degrees clockwise): the box drawn on the
  displayed photo must land on the right pixels."""
  raw = np.zeros((40, 60, 3), np.uint8)
  raw[:10, :20] = (255, 0, 0)  # Raw top-left: displayed top-right.
  exif = Image.Exif()
  exif[source_lib.EXIF_ORIENTATION] = 6
  path = tmp_path / "rotated.jpg"
  Image.fromarray(raw).save(path, quality=95, exif=exif)
  image = source_lib.decode_image(str(path), expected_size=(60, 40))
  assert image.shape == (60, 40, 3)
  assert np.abs(image.astype(int) - np.rot90(raw, k=-1)).mean() < 5  # JPEG blurs the edges.
  assert image[2:18, 32:, 0].min() > 200 and image[25:, :, 0].max() < 60
  assert source_lib.image_size(str(path)) == (60, 40)
  with pytest.raises(source_lib.BadImageError, match="rotated.jpg.*40x60.*60x40"):
    source_lib.decode_image(str(path), expected_size=(40, 60))


def test_unreadable_images_raise_naming_the_file(tmp_path):
  photo = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                     np.uint8)), "JPEG")
  cases = {"missing.jpg": None, "garbage.jpg": b"\x00not an image" * 10,
           "truncated.jpg": photo[:len(photo) // 2], "empty.jpg": b""}
  for name, data in cases.items():
    if data is not None:
      (tmp_path / name).write_bytes(data)
    with pytest.raises(source_lib.BadImageError, match=name):
      source_lib.decode_image(str(tmp_path / name))
  with pytest.raises(source_lib.BadImageError, match="my image"):
    source_lib.decode_image(photo[:100], name="my image")


def test_build_coco_gt_writes_xywh_with_original_category_ids():
  gt = source_lib.build_coco_gt(("a", "b"), (5, 9), images=[(7, 30, 40)],
                                annotations=[(1, 7, 1, [2.0, 3.0, 12.0, 8.0], 50.0, True)])
  assert gt["images"] == [{"id": 7, "height": 30, "width": 40}]
  assert gt["annotations"] == [{"id": 1, "image_id": 7, "category_id": 9,
                                "bbox": [2.0, 3.0, 10.0, 5.0], "area": 50.0, "iscrowd": 1}]
  assert gt["categories"] == [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]
