"""TensorFlow Datasets: read detection sets with `tfds.data_source`; build one from a COCO folder.

Reading (`TfdsSource`): any TFDS detection dataset with COCO's feature layout (`image`,
`image/id`, `objects` with `bbox` normalized [ymin, xmin, ymax, xmax], `label`, `is_crowd`,
optional `id` and `area`) stored as array_record, e.g. `coco/2017` once prepared, or a set built
by `build_coco_folder`. Images are read as encoded bytes and decoded by `source.decode_image`
(EXIF orientation, every colour mode), the same code as for COCO folders.

Building (`build_coco_folder`): turns any COCO-format folder into array_record files
(`<data_dir>/coco_folder/<name>/1.0.0/`) for fast random access from many hosts; read it back
with tfds_name "coco_folder/<name>". Annotations go through `coco.read_coco` (same validation and
policies); image files are stored byte for byte. The builder also records the original category
ids and each split's image sizes (so batches can be grouped by orientation without decoding).

TensorFlow is not needed for either: measured with tensorflow-datasets 4.9.10 and no TensorFlow,
builders given image paths or bytes write array_record and `tfds.data_source` reads it. Only
TFDS's stock builders that decode while preparing (`coco/2017`'s download_and_prepare) need it:
prepare those once with the optional extra `pip install tensorflow`.
"""
import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from sparse_rcnn_jax.data import coco
from sparse_rcnn_jax.data import source as source_lib
from sparse_rcnn_jax.data import transforms

# COCO's 80 category ids, for `coco/2017` whose labels are their ranks.
COCO_CATEGORY_IDS = (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67,
                     70, *range(72, 83), *range(84, 91))


@dataclasses.dataclass
class CocoFolderConfig(tfds.core.BuilderConfig):
  """Attributes: splits: split name -> (instances json, image folder); policies as coco.py."""
  splits: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
  on_bad_annotation: str = "error"
  on_bad_image: str = "skip"


class CocoFolder(tfds.core.GeneratorBasedBuilder):
  """COCO-format folder -> TFDS with `coco/2017`'s feature layout."""
  VERSION = tfds.core.Version("1.0.0")
  # Nothing is downloaded, so there are no checksum files to find next to the code (finding them
  # in a package needs `importlib_resources`, which tensorflow-datasets only installs before
  # Python 3.9).
  code_path = None

  def _tables(self) -> dict[str, coco.CocoTable]:
    if not hasattr(self, "_table_cache"):
      config = self.builder_config
      self._table_cache = {
          split: coco.read_coco(ann, images, config.on_bad_annotation, config.on_bad_image)
          for split, (ann, images) in config.splits.items()}
      names = {(t.class_names, t.category_ids) for t in self._table_cache.values()}
      if len(names) != 1:
        raise ValueError(f"The splits of {config.name} list different categories: "
                         f"{sorted(config.splits.items())}")
    return self._table_cache

  def _info(self) -> tfds.core.DatasetInfo:
    tables = self._tables()
    first = next(iter(tables.values()))
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"COCO-format folder {self.builder_config.name}",
        # Examples stay in the json's order, so the image sizes in the metadata line up.
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image/id": np.int64,
            "image/filename": tfds.features.Text(),
            "objects": tfds.features.Sequence({
                "id": np.int64,
                "area": np.float32,
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=first.class_names),
                "is_crowd": np.bool_,
            }),
        }),
        metadata=tfds.core.MetadataDict(
            category_ids=list(first.category_ids),
            image_sizes={split: t.sizes.tolist() for split, t in tables.items()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {split: self._generate_examples(table) for split, table in self._tables().items()}

  def _generate_examples(self, table: coco.CocoTable):
    for i, image_id in enumerate(table.image_ids):
      rows = slice(table.box_start[i], table.box_start[i + 1])
      h, w = table.sizes[i]
      boxes = table.boxes[rows] / [w, h, w, h]
      yield i, {
          "image": os.path.join(table.image_dir, table.file_names[i]),
          "image/id": image_id,
          "image/filename": table.file_names[i],
          "objects": {
              "id": np.arange(rows.start, rows.stop) + 1,
              "area": table.areas[rows].astype(np.float32),
              "bbox": np.clip(boxes[:, [1, 0, 3, 2]], 0.0, 1.0).astype(np.float32),
              "label": table.labels[rows],
              "is_crowd": table.is_crowd[rows],
          },
      }


def build_coco_folder(name: str, splits: dict[str, tuple[str, str]], data_dir: str,
                      on_bad_annotation: str = "error", on_bad_image: str = "skip") -> str:
  """Writes a COCO-format folder as TFDS array_record files; returns the dataset directory.

  Args:
    name: the dataset's name; read it back as tfds_name "coco_folder/<name>".
    splits: split name -> (instances json, image folder), e.g. {"train": (...), "test": (...)}.
    data_dir: TFDS data directory.
    on_bad_annotation, on_bad_image: as for COCO folders (coco.py).
  """
  builder = CocoFolder(
      config=CocoFolderConfig(name=name, splits=dict(splits), on_bad_annotation=on_bad_annotation,
                              on_bad_image=on_bad_image),
      data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


class TfdsSource(source_lib.DetectionSource):
  """One split of a TFDS detection dataset as a `DetectionSource`."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    builder = tfds.builder(name, data_dir=data_dir)
    self.name, self.split = name, split
    self._data = builder.as_data_source(split=split,
                                        decoders={"image": tfds.decode.SkipDecoding()})
    self.class_names = tuple(builder.info.features["objects"]["label"].names)
    metadata = builder.info.metadata or {}
    if "category_ids" in metadata:
      self.category_ids = tuple(metadata["category_ids"])
    elif builder.name == "coco" and self.num_classes == len(COCO_CATEGORY_IDS):
      self.category_ids = COCO_CATEGORY_IDS
    else:
      self.category_ids = tuple(range(1, self.num_classes + 1))
    # Recorded sizes line up only with a whole split ("train", not "train[:10%]").
    sizes = metadata.get("image_sizes", {}).get(split)
    self.image_sizes = None if sizes is None else np.array(sizes, np.int32).reshape(-1, 2)
    self.num_boxes = None

  @classmethod
  def from_config(cls, data, split: str) -> "TfdsSource":
    """Split "train" or "eval" of `config.data` (tfds_name, {train,eval}_split, tfds_data_dir)."""
    return cls(data.tfds_name, data.train_split if split == "train" else data.eval_split,
               data_dir=data.tfds_data_dir or None)

  def __len__(self) -> int:
    return len(self._data)

  def _read(self, index: int) -> tuple[dict[str, Any], str]:
    record = self._data[index]
    filename = record.get("image/filename", b"")
    filename = filename.decode() if isinstance(filename, bytes) else str(filename)
    return record, f"{self.name}/{self.split}[{index}] {filename}".rstrip()

  def example(self, index: int) -> source_lib.Example:
    record, name = self._read(index)
    expected = None if self.image_sizes is None else tuple(self.image_sizes[index])
    image = source_lib.decode_image(record["image"], name=name, expected_size=expected)
    h, w = image.shape[:2]
    objects = record["objects"]
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]] * [w, h, w, h]
    labels = np.asarray(objects["label"], np.int32).reshape(-1)
    keep = ~np.asarray(objects["is_crowd"], bool).reshape(-1)
    boxes, labels = transforms.clip_boxes(boxes[keep], labels[keep], h, w)
    return source_lib.Example(image=image, boxes=boxes, labels=labels,
                              image_id=int(record.get("image/id", index)), orig_size=(h, w))

  def coco_gt(self) -> dict[str, Any]:
    """Reads the whole split once (tqdm): boxes, and image sizes unless recorded."""
    images, annotations = [], []
    for index in tqdm.tqdm(range(len(self)), desc=f"ground truth of {self.name}/{self.split}"):
      record, _ = self._read(index)
      h, w = (self.image_sizes[index] if self.image_sizes is not None
              else source_lib.image_size(record["image"]))
      image_id = int(record.get("image/id", index))
      images.append((image_id, h, w))
      objects = record["objects"]
      boxes = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)[:, [1, 0, 3, 2]] * [w, h, w, h]
      areas = objects.get("area", (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
      for box, label, area, crowd in zip(boxes, objects["label"], areas, objects["is_crowd"]):
        annotations.append((len(annotations) + 1, image_id, int(label), box, area, crowd))
    return source_lib.build_coco_gt(self.class_names, self.category_ids, images,
                                    annotations)
