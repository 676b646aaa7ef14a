"""The dataset check: every kind of bad image file and bad annotation, found before training,
reported all at once with counts, and the `python -m sparse_rcnn_jax.data.check` command."""
import json
import os
import pathlib
import re
import subprocess
import sys
import unicodedata

import numpy as np
from PIL import Image
import pytest

from sparse_rcnn_jax.data import check
from sparse_rcnn_jax.data import coco
from sparse_rcnn_jax.data import config as data_config
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.data import source as source_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
H, W = 48, 64


def _pixels(h=H, w=W, seed=0) -> np.ndarray:
  # Noise, so a JPEG is a few kilobytes and half of it lacks the end marker.
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_jpeg(path: pathlib.Path, h=H, w=W, **save_args) -> pathlib.Path:
  Image.fromarray(_pixels(h, w)).save(path, "JPEG", quality=90, **save_args)
  return path


def write_png(path: pathlib.Path, h=H, w=W) -> pathlib.Path:
  Image.fromarray(_pixels(h, w)).save(path, "PNG")
  return path


def truncate(path: pathlib.Path) -> pathlib.Path:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return path


def write_exif_rotated(path: pathlib.Path) -> pathlib.Path:
  """A 64x48 (w x h) stored JPEG whose EXIF orientation 6 displays it as 48x64."""
  exif = Image.Exif()
  exif[source_lib.EXIF_ORIENTATION] = 6
  return write_jpeg(path, exif=exif)


def write_undecodable_jpeg(path: pathlib.Path) -> pathlib.Path:
  """A progressive JPEG whose header and end marker are fine but whose middle scan header names
  7 components: only decoding it fails."""
  write_jpeg(path, progressive=True)
  data = bytearray(path.read_bytes())
  scans = [m.start() for m in re.finditer(b"\xff\xda", bytes(data))]
  assert len(scans) > 3, "expected a progressive JPEG with several scans"
  data[scans[len(scans) // 2] + 4] = 7  # Ns, the scan's number of components
  path.write_bytes(bytes(data))
  return path


def write_json(path: pathlib.Path, images, annotations=(), categories=((1, "cell"),),
               **extra) -> pathlib.Path:
  """A COCO json; `images` are (file_name, h, w) (h, w may be None: left out)."""
  entries = []
  for k, (name, h, w) in enumerate(images):
    entry = {"id": k + 1, "file_name": name}
    if h is not None:
      entry.update(height=h, width=w)
    entries.append(entry)
  data = {"images": entries, "categories": [{"id": i, "name": n} for i, n in categories],
          **extra}
  if annotations is not None:
    data["annotations"] = [dict(ann, id=ann.get("id", k + 1))
                           for k, ann in enumerate(annotations)]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data))
  return path


def box(image_id, bbox, **extra):
  return {"image_id": image_id, "category_id": 1, "bbox": list(bbox), **extra}


def kind_of(path, expected_size=None, decode=False) -> str:
  with pytest.raises(source_lib.BadImageError) as error:
    source_lib.read_header(str(path), expected_size, decode=decode)
  assert str(path) in str(error.value)
  assert error.value.kind in source_lib.IMAGE_PROBLEMS
  return error.value.kind


# --- read_header: one file at a time ---------------------------------------------------------

def test_a_good_file_passes_and_gives_its_size(tmp_path):
  assert source_lib.read_header(str(write_jpeg(tmp_path / "a.jpg"))) == (H, W)
  assert source_lib.read_header(str(write_jpeg(tmp_path / "b.jpg")), (H, W), decode=True) == (H, W)
  assert source_lib.read_header(str(write_png(tmp_path / "c.png")), (H, W)) == (H, W)


def test_truncated_jpeg(tmp_path):
  path = truncate(write_jpeg(tmp_path / "cut.jpg"))
  assert os.path.getsize(path) > 1024  # The end marker is not simply out of reach.
  with pytest.raises(source_lib.BadImageError, match=r"JPEG file is truncated") as error:
    source_lib.read_header(str(path), (H, W))
  assert error.value.kind == "truncated file"


def test_truncated_png(tmp_path):
  path = truncate(write_png(tmp_path / "cut.png"))
  assert kind_of(path, (H, W)) == "truncated file"


def test_empty_file(tmp_path):
  path = tmp_path / "empty.jpg"
  path.write_bytes(b"")
  assert kind_of(path) == "empty file"


def test_not_an_image(tmp_path):
  path = tmp_path / "notes.jpg"
  path.write_text("these are not pixels\n" * 20)
  assert kind_of(path) == "unreadable header"


def test_missing_file(tmp_path):
  path = tmp_path / "gone.jpg"
  with pytest.raises(source_lib.BadImageError, match="does not exist") as error:
    source_lib.read_header(str(path))
  assert error.value.kind == "missing file"
  assert "Unicode normalization" not in str(error.value)


def test_size_differs_from_the_json(tmp_path):
  path = write_jpeg(tmp_path / "a.jpg")
  with pytest.raises(source_lib.BadImageError) as error:
    source_lib.read_header(str(path), (H + 2, W))
  assert error.value.kind == "size differs from the json"
  assert f"is {W}x{H}" in str(error.value) and f"json says {W}x{H + 2}" in str(error.value)


def test_exif_rotated_photo_annotated_in_stored_pixels(tmp_path):
  path = write_exif_rotated(tmp_path / "photo.jpg")
  # The json gives the stored size (width 64, height 48): boxes drawn on the unrotated pixels.
  with pytest.raises(source_lib.BadImageError, match="EXIF orientation 6") as error:
    source_lib.read_header(str(path), (48, 64))
  assert error.value.kind == "EXIF-rotated, annotated in stored pixels"
  # The json gives the displayed size (width 48, height 64): fine, headers and decoding alike.
  assert source_lib.read_header(str(path), (64, 48)) == (64, 48)
  assert source_lib.read_header(str(path)) == (64, 48)
  assert source_lib.read_header(str(path), (64, 48), decode=True) == (64, 48)
  # Any other size is a plain size mismatch.
  assert kind_of(path, (50, 50)) == "size differs from the json"


def test_nfd_file_name_says_unicode_normalization(tmp_path):
  nfc, nfd = unicodedata.normalize("NFC", "café.jpg"), unicodedata.normalize("NFD", "café.jpg")
  assert nfc != nfd
  write_jpeg(tmp_path / nfd)
  if (tmp_path / nfc).exists():
    pytest.skip("this filesystem normalizes file names: NFC and NFD name the same file")
  with pytest.raises(source_lib.BadImageError, match="Unicode normalization") as error:
    source_lib.read_header(str(tmp_path / nfc))
  assert error.value.kind == "missing file" and "NFD" in str(error.value)
  # The same through a json naming the NFC file, under every check mode.
  ann = write_json(tmp_path / "ann.json", [(nfc, H, W)], [box(1, (1, 1, 5, 5))])
  for mode in coco.CHECKS:
    scan = coco.scan_coco(str(ann), str(tmp_path), check=mode)
    assert scan.image_problems.counts == {"missing file": 1}, mode
    assert "Unicode normalization" in scan.image_report(), mode


def test_decode_finds_what_headers_do_not(tmp_path):
  path = write_undecodable_jpeg(tmp_path / "broken.jpg")
  assert source_lib.read_header(str(path), (H, W)) == (H, W)
  assert kind_of(path, (H, W), decode=True) == "cannot decode"


# --- a whole json: every problem at once -----------------------------------------------------

def bad_image_folder(root: pathlib.Path) -> tuple[str, str]:
  """Two good images, two truncated, one empty, one missing, one of the wrong size; each with
  a box. Returns (json, image folder)."""
  images = root / "images"
  images.mkdir(parents=True)
  write_jpeg(images / "good1.jpg")
  write_png(images / "good2.png")
  truncate(write_jpeg(images / "cut1.jpg"))
  truncate(write_jpeg(images / "cut2.jpg"))
  (images / "empty.jpg").write_bytes(b"")
  write_jpeg(images / "small.jpg", h=H // 2)
  names = ["good1.jpg", "good2.png", "cut1.jpg", "cut2.jpg", "empty.jpg", "missing.jpg",
           "small.jpg"]
  ann = write_json(root / "instances.json", [(n, H, W) for n in names],
                   [box(k + 1, (2, 3, 10, 10)) for k in range(len(names))])
  return str(ann), str(images)


def test_bad_images_under_error_are_all_listed_in_one_error(tmp_path):
  ann, images = bad_image_folder(tmp_path)
  with pytest.raises(source_lib.DataError) as error:
    coco.read_coco(ann, images, on_bad_image="error")
  message = str(error.value)
  assert "5 of the 7 images" in message
  for line in ("2 x truncated file", "1 x empty file", "1 x missing file",
               "1 x size differs from the json"):
    assert line in message
  for name in ("cut1.jpg", "cut2.jpg", "empty.jpg", "missing.jpg", "small.jpg"):
    assert name in message
  assert "good1.jpg" not in message and "good2.png" not in message
  assert "on_bad_image='skip'" in message
  # The boxes of the bad images are not bad annotations.
  assert "annotations of" not in message and "on_bad_annotation" not in message
  with pytest.raises(source_lib.DataError, match="2 x truncated file"):
    coco.CocoSource(ann, images, on_bad_image="error")


def test_bad_images_under_skip_are_left_out(tmp_path):
  ann, images = bad_image_folder(tmp_path)
  table = coco.read_coco(ann, images, on_bad_image="skip")
  assert table.file_names == ("good1.jpg", "good2.png")
  assert table.image_ids.tolist() == [1, 2]
  assert table.box_start.tolist() == [0, 1, 2]
  np.testing.assert_allclose(table.boxes, [[2, 3, 12, 13]] * 2)
  scan = coco.scan_coco(ann, images)
  assert scan.num_images == 7 and scan.image_problems.total == 5
  assert not scan.annotation_problems
  source = coco.CocoSource(ann, images)
  assert len(source) == 2 and source.example(1).image.shape == (H, W, 3)


def test_more_examples_than_shown_are_counted(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  write_jpeg(images / "good.jpg")
  names = ["good.jpg"] + [f"missing{k}.jpg" for k in range(5)]
  ann = write_json(tmp_path / "a.json", [(n, H, W) for n in names])
  with pytest.raises(source_lib.DataError) as error:
    coco.read_coco(str(ann), str(images), on_bad_image="error")
  message = str(error.value)
  assert "5 x missing file" in message and "... and 2 more" in message
  assert sum(f"missing{k}.jpg" in message for k in range(5)) == 3


def test_bad_images_and_bad_annotations_together_in_one_error(tmp_path):
  ann, images = bad_image_folder(tmp_path)
  _edit(ann, lambda d: d["annotations"].append(box(1, (2, 3, 0, 5), id=99)))
  with pytest.raises(source_lib.DataError) as error:
    coco.read_coco(ann, images, on_bad_image="error", on_bad_annotation="error")
  message = str(error.value)
  assert "2 x truncated file" in message and "1 x empty bbox" in message
  assert "annotation 99" in message and "on_bad_annotation='skip'" in message


def _edit(ann_path, edit):
  path = pathlib.Path(ann_path)
  data = json.loads(path.read_text())
  edit(data)
  path.write_text(json.dumps(data))


def test_check_modes(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  write_jpeg(images / "good.jpg")
  truncate(write_jpeg(images / "cut.jpg"))
  write_undecodable_jpeg(images / "broken.jpg")
  ann = write_json(tmp_path / "a.json",
                   [("good.jpg", H, W), ("cut.jpg", H, W), ("broken.jpg", H, W)],
                   [box(1, (1, 1, 5, 5)), box(2, (1, 1, 5, 5)), box(3, (1, 1, 5, 5))])
  off = coco.scan_coco(str(ann), str(images), check="off")
  assert not off.image_problems and off.table.file_names == ("good.jpg", "cut.jpg", "broken.jpg")
  headers = coco.scan_coco(str(ann), str(images), check="headers")
  assert headers.image_problems.counts == {"truncated file": 1}
  assert headers.table.file_names == ("good.jpg", "broken.jpg")
  decode = coco.scan_coco(str(ann), str(images), check="decode")
  assert decode.image_problems.counts == {"truncated file": 1, "cannot decode": 1}
  assert decode.table.file_names == ("good.jpg",)
  table = coco.read_coco(str(ann), str(images), on_bad_image="error", check="off")
  assert len(table.image_ids) == 3
  with pytest.raises(ValueError, match="config.data.check must be one of"):
    coco.scan_coco(str(ann), str(images), check="fast")


def test_check_off_still_needs_the_files_and_reads_missing_sizes(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  write_exif_rotated(images / "photo.jpg")
  ann = write_json(tmp_path / "a.json", [("photo.jpg", None, None), ("gone.jpg", H, W)])
  scan = coco.scan_coco(str(ann), str(images), check="off")
  assert scan.image_problems.counts == {"missing file": 1}
  assert scan.table.sizes.tolist() == [[64, 48]]  # From the header, EXIF orientation applied.


BAD_ANNOTATIONS = [  # (annotation, kind); images are 64x48 (w x h)
    (box(42, (1, 1, 5, 5)), "unknown image"),
    (box(77, (1, 1, 5, 5)), "unknown image"),
    ({"image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]}, "unknown category"),
    (box(1, (1, 1, 5)), "malformed bbox"),
    (box(1, (1, 1, 0, 5)), "empty bbox"),
    (box(2, (1, 1, 5, -2)), "empty bbox"),
    (box(1, (70, 10, 5, 5)), "bbox outside image"),
    (box(2, (50, 10, 20, 5)), "bbox crosses the border"),
    ("not a dict", "malformed annotation"),
]


def test_bad_annotations_under_error_are_all_listed_with_counts(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  write_jpeg(images / "a.jpg")
  write_jpeg(images / "b.jpg")
  good = [box(1, (4, 6, 20, 12)), box(2, (0, 0, 64, 48))]
  raw = good + [ann for ann, _ in BAD_ANNOTATIONS]
  ann = write_json(tmp_path / "a.json", [("a.jpg", H, W), ("b.jpg", H, W)], annotations=None)
  _edit(ann, lambda d: d.update(annotations=raw))
  with pytest.raises(source_lib.DataError) as error:
    coco.read_coco(str(ann), str(images))
  message = str(error.value)
  assert f"{len(BAD_ANNOTATIONS)} of the {len(raw)} annotations" in message
  expected = {}
  for _, kind in BAD_ANNOTATIONS:
    expected[kind] = expected.get(kind, 0) + 1
  for kind, count in expected.items():
    assert f"{count} x {kind}" in message, kind
  assert "image_id 42" in message and "image_id 77" in message
  assert "category_id 9" in message
  # Under skip: the good boxes, and the crossing one clipped; the rest dropped.
  table = coco.read_coco(str(ann), str(images), on_bad_annotation="skip")
  np.testing.assert_allclose(table.boxes, [[4, 6, 24, 18], [0, 0, 64, 48], [50, 10, 64, 15]])
  assert table.num_clipped == 1


def test_a_box_crossing_the_border_is_an_error_or_is_clipped_and_counted(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  write_jpeg(images / "a.jpg")
  ann = write_json(tmp_path / "a.json", [("a.jpg", H, W)], [
      box(1, (-3, 10, 20, 5), id=5),         # left by 3 px
      box(1, (10, 40, 5, 8.5), id=6),         # bottom by 0.5 px: within the tolerance
      box(1, (30, 20, 10, 10), id=7),         # inside
  ])
  with pytest.raises(source_lib.DataError) as error:
    coco.read_coco(str(ann), str(images), on_bad_annotation="error")
  message = str(error.value)
  assert "1 x bbox crosses the border" in message and "annotation 5 " in message
  assert "annotation 6 " not in message
  table = coco.read_coco(str(ann), str(images), on_bad_annotation="skip")
  np.testing.assert_allclose(table.boxes, [[0, 10, 17, 15], [10, 40, 15, 48], [30, 20, 40, 30]])
  assert table.num_clipped == 1
  scan = coco.scan_coco(str(ann), str(images), clip=True)
  assert not scan.annotation_problems and scan.table.num_clipped == 1


def test_a_box_with_nothing_inside_the_image_is_dropped_under_skip(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  write_jpeg(images / "a.jpg")
  ann = write_json(tmp_path / "a.json", [("a.jpg", H, W)], [
      box(1, (70, 10, 5, 5)), box(1, (10, -20, 5, 10)), box(1, (60, 10, 10, 5))])
  table = coco.read_coco(str(ann), str(images), on_bad_annotation="skip")
  np.testing.assert_allclose(table.boxes, [[60, 10, 64, 15]])
  assert table.num_clipped == 1
  scan = coco.scan_coco(str(ann), str(images), clip=True)
  assert scan.annotation_problems.counts == {"bbox outside image": 2}


# --- empty training split --------------------------------------------------------------------

def _one_image_folder(root: pathlib.Path) -> pathlib.Path:
  images = root / "images"
  images.mkdir(parents=True)
  write_jpeg(images / "a.jpg")
  write_jpeg(images / "b.jpg")
  return images


def data_cfg(**fields):
  cfg = data_config.default_config()
  cfg.update(**{k: os.fspath(v) if isinstance(v, pathlib.Path) else v
                for k, v in fields.items()})
  return cfg


@pytest.mark.parametrize("annotations", [None, [],
                                         [box(1, (1, 1, 5, 5), iscrowd=1)]],
                         ids=["no key", "empty list", "only crowd"])
def test_a_training_split_without_boxes_is_an_error_unless_allowed(tmp_path, annotations):
  images = _one_image_folder(tmp_path)
  ann = write_json(tmp_path / "empty.json", [("a.jpg", H, W), ("b.jpg", H, W)], annotations)
  assert ("annotations" in json.loads(ann.read_text())) == (annotations is not None)
  cfg = data_cfg(train_ann=ann, train_images=images)
  with pytest.raises(source_lib.DataError) as error:
    pipeline.load_source(cfg, "train")
  message = str(error.value)
  assert str(ann) in message and "allow_empty_train" in message and "2 images" in message
  cfg.allow_empty_train = True
  source = pipeline.load_source(cfg, "train")
  assert len(source) == 2 and source.num_boxes.tolist() == [0, 0]
  # As the evaluation split it is fine.
  source = pipeline.load_source(data_cfg(eval_ann=ann, eval_images=images), "eval")
  assert len(source) == 2


# --- check.check and the command -------------------------------------------------------------

def test_check_reports_what_stops_training(tmp_path):
  ann, images = bad_image_folder(tmp_path / "train")
  _edit(ann, lambda d: d["annotations"].append(box(1, (60, 10, 10, 5), id=99)))
  eval_images = _one_image_folder(tmp_path / "eval")
  eval_ann = write_json(tmp_path / "eval" / "val.json", [("a.jpg", H, W), ("b.jpg", H, W)],
                        [box(1, (1, 1, 5, 5))])
  cfg = data_cfg(train_ann=ann, train_images=images, eval_ann=eval_ann, eval_images=eval_images,
                 on_bad_image="error", on_bad_annotation="error")
  train, evaluation = check.check(cfg)
  assert (train.split, evaluation.split) == ("train", "eval")
  assert train.fatal == ("5 bad images under on_bad_image='error'",
                         "1 bad annotations under on_bad_annotation='error'")
  assert evaluation.fatal == ()
  text = train.text()
  assert "2 of 7 images usable" in text and "2 x truncated file" in text
  assert "1 x bbox crosses the border" in text and "STOPS TRAINING" in text
  assert "no problems" in evaluation.text() and "2 of 2 images usable, 1 boxes" in evaluation.text()
  # Under the skip policies the same problems are warnings; the crossing box is clipped.
  cfg.update(on_bad_image="skip", on_bad_annotation="skip")
  train, _ = check.check(cfg)
  assert train.fatal == () and train.scan.table.num_clipped == 1
  assert "1 boxes crossing the image border" in train.text()
  assert "2 x truncated file" in train.text() and "STOPS TRAINING" not in train.text()


def test_check_modes_and_empty_training_split_in_the_report(tmp_path):
  images = _one_image_folder(tmp_path)
  write_undecodable_jpeg(images / "b.jpg")
  ann = write_json(tmp_path / "a.json", [("a.jpg", H, W), ("b.jpg", H, W)], [])
  cfg = data_cfg(train_ann=ann, train_images=images, on_bad_image="error")
  (report,) = check.check(cfg)
  (empty,) = report.fatal
  assert "has no boxes" in empty and str(ann) in empty and "2 images" in empty
  assert "config.data.allow_empty_train=True" in empty
  with pytest.raises(source_lib.DataError) as loading:  # the same rule when a run loads it
    pipeline.load_source(cfg, "train")
  assert str(loading.value) == empty
  (report,) = check.check(cfg, "decode")
  assert report.scan.image_problems.counts == {"cannot decode": 1}
  assert report.fatal[0] == "1 bad images under on_bad_image='error'"
  cfg.update(allow_empty_train=True, check="decode")
  (report,) = check.check(cfg)
  assert len(report.fatal) == 1 and "cannot decode" in report.text()


def test_check_needs_a_coco_training_split(tmp_path):
  with pytest.raises(ValueError, match="No training split"):
    check.check(data_cfg())
  with pytest.raises(ValueError, match="reads COCO-format folders"):
    check.check(data_cfg(source="tfds"))


def _run_check(root: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "sparse_rcnn_jax.data.check", "--config", "configs/custom.py",
       f"--config.data.coco_root={root}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_the_check_command(tmp_path):
  good = tmp_path / "good"
  (good / "images").mkdir(parents=True)
  write_jpeg(good / "images" / "a.jpg")
  write_json(good / "annotations" / "train.json", [("a.jpg", H, W)], [box(1, (1, 1, 5, 5))])
  proc = _run_check(good)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "no problems" in proc.stdout and "1 of 1 images usable, 1 boxes" in proc.stdout
  assert str(good / "annotations" / "train.json") in proc.stdout

  bad = tmp_path / "bad"
  (bad / "train").mkdir(parents=True)
  write_jpeg(bad / "train" / "a.jpg")
  truncate(write_jpeg(bad / "train" / "cut.jpg"))
  write_json(bad / "train" / "_annotations.coco.json", [("a.jpg", H, W), ("cut.jpg", H, W)],
             [box(1, (1, 1, 5, 5)), box(1, (50, 10, 20, 5))])
  proc = _run_check(bad)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "1 x bbox crosses the border" in proc.stdout and "1 x truncated file" in proc.stdout
  assert "STOPS TRAINING: 1 bad annotations under on_bad_annotation='error'" in proc.stdout
  assert "bad images under" not in proc.stdout  # custom.py skips bad images


def test_the_check_command_reports_an_unreadable_json_without_a_traceback(tmp_path, capsys):
  """A cut-off json (on the command line) and duplicate image ids (through check.main): the
  message on stderr and exit status 1, no Python traceback."""
  cut = tmp_path / "cut"
  (cut / "images").mkdir(parents=True)
  write_jpeg(cut / "images" / "a.jpg")
  ann = write_json(cut / "annotations" / "train.json", [("a.jpg", H, W)],
                   [box(1, (1, 1, 5, 5))])
  ann.write_text(ann.read_text()[:-20])
  proc = _run_check(cut)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr and str(ann) in proc.stderr
  assert not proc.stdout.strip()

  twice = tmp_path / "twice"
  (twice / "images").mkdir(parents=True)
  write_jpeg(twice / "images" / "a.jpg")
  ann = write_json(twice / "annotations" / "train.json", [("a.jpg", H, W), ("a.jpg", H, W)],
                   [box(1, (1, 1, 5, 5))])
  entries = json.loads(ann.read_text())
  entries["images"][1]["id"] = entries["images"][0]["id"]
  ann.write_text(json.dumps(entries))
  assert check.main(data_cfg(coco_root=str(twice)), decode=False) == 1
  err = capsys.readouterr().err
  assert "image id 1 appears twice" in err and str(ann) in err and "Traceback" not in err
