"""Image files without annotations as a dataset source: what prediction reads, through the same
test transform, buckets and loader as evaluation."""
import pathlib
from typing import Any, Sequence

import numpy as np

from sparse_rcnn_jax.data import info as info_lib
from sparse_rcnn_jax.data import source as source_lib


class ImageFilesSource(source_lib.DetectionSource):
  """`paths[i]` is image i (image_id i), with no boxes; the classes are a trained model's."""

  def __init__(self, paths: Sequence[str | pathlib.Path], info: info_lib.DatasetInfo):
    self.paths = tuple(pathlib.Path(p) for p in paths)
    self.class_names = info.class_names
    self.category_ids = info.category_ids
    self.num_boxes = np.zeros(len(self.paths), np.int64)
    try:
      self.image_sizes = np.array([source_lib.image_size(p) for p in self.paths],
                                  np.int32).reshape(-1, 2)
    except (OSError, ValueError):
      self.image_sizes = None  # An unreadable header: sizes are learned when decoding.

  def __len__(self) -> int:
    return len(self.paths)

  def example(self, index: int) -> source_lib.Example:
    image = source_lib.decode_image(self.paths[index])
    return source_lib.Example(image=image, boxes=np.zeros((0, 4), np.float32),
                              labels=np.zeros(0, np.int32), image_id=index,
                              orig_size=image.shape[:2])

  def coco_gt(self) -> dict[str, Any]:
    """The images without annotations (no AP can be computed from it)."""
    sizes = self.image_sizes if self.image_sizes is not None else np.zeros((len(self), 2))
    return source_lib.build_coco_gt(self.class_names, self.category_ids,
                                    images=((i, h, w) for i, (h, w) in enumerate(sizes)),
                                    annotations=())
