"""Where a COCO-format folder keeps its splits: `config.data.coco_root` -> json and image folder.

One flag, `--config.data.coco_root=DIR`, names a dataset laid out in one of the usual ways
(LAYOUTS, tried in this order; the first whose training json exists is used):
  "annotations/":  DIR/annotations/{train,val}.json, images in DIR/images/
  "COCO":          DIR/annotations/instances_{train,val}2017.json, images in DIR/{train,val}2017/
  "Roboflow":      DIR/{train,valid}/_annotations.coco.json beside the images (also DIR/val/)
The evaluation split is optional: a layout without one trains without evaluating. The explicit
fields `data.{train,eval}_{ann,images}` override what the layout finds, split by split.
Nothing here writes into the config: `coco_split` is asked each time a split is loaded.
"""
import dataclasses
import os
from typing import Callable

import ml_collections

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One way of laying out a COCO folder.

  Attributes:
    name: what the README and errors call it.
    names: per split, the names the split goes by (the first existing one is used).
    paths: (root, split name) -> (instances json, image folder).
  """
  name: str
  names: dict[str, tuple[str, ...]]
  paths: Callable[[str, str], tuple[str, str]]


LAYOUTS = (
    Layout("annotations/", {"train": ("train",), "eval": ("val", "valid", "test")},
           lambda root, s: (os.path.join(root, "annotations", f"{s}.json"),
                            os.path.join(root, "images"))),
    Layout("COCO", {"train": ("train2017",), "eval": ("val2017",)},
           lambda root, s: (os.path.join(root, "annotations", f"instances_{s}.json"),
                            os.path.join(root, s))),
    Layout("Roboflow", {"train": ("train",), "eval": ("valid", "val", "test")},
           lambda root, s: (os.path.join(root, s, "_annotations.coco.json"),
                            os.path.join(root, s))),
)


def _candidates(root: str, split: str) -> list[tuple[Layout, str, str]]:
  return [(layout, *layout.paths(root, name)) for layout in LAYOUTS
          for name in layout.names[split]]


def find_layout(root: str) -> Layout:
  """The layout of the folder `root`: the first of LAYOUTS whose training json exists.

  Raises:
    FileNotFoundError: listing every path looked for.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config.data.coco_root={root!r} is not a folder")
  for layout, ann, _ in _candidates(root, "train"):
    if os.path.isfile(ann):
      return layout
  looked_for = "\n".join(f"  {ann}  ({layout.name} layout)"
                         for layout, ann, _ in _candidates(root, "train"))
  raise FileNotFoundError(
      f"config.data.coco_root={root!r} holds no COCO training json where one of the known "
      f"layouts keeps it. Looked for:\n{looked_for}\nMove the files into one of these layouts, "
      "or name them with config.data.train_ann and config.data.train_images (and eval_ann, "
      "eval_images).")


def coco_split(data: ml_collections.ConfigDict, split: str) -> tuple[str, str] | None:
  """(instances json, image folder) of split "train" or "eval" named by `config.data`.

  The explicit fields {split}_ann / {split}_images win; else `coco_root`'s layout. None when
  the split is not named (an eval split is optional; a missing train split is an error to the
  caller).
  Raises:
    FileNotFoundError: `coco_root` matches no layout, or the layout's image folder is missing.
    ValueError: only one of {split}_ann and {split}_images is set.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  ann, images = data.get(f"{split}_ann", ""), data.get(f"{split}_images", "")
  if ann or images:
    if not (ann and images):
      raise ValueError(f"config.data.{split}_ann and config.data.{split}_images go together: "
                       f"got {split}_ann={ann!r}, {split}_images={images!r}")
    return ann, images
  root = data.get("coco_root", "")
  return split_in(root, split) if root else None


def split_in(root: str, split: str) -> tuple[str, str] | None:
  """(instances json, image folder) of split "train" or "eval" in the folder `root`, by its
  layout; None when the layout has no such split.
  Raises:
    ValueError: an unknown split.
    FileNotFoundError: `root` matches no layout, or the layout's image folder is missing.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  layout = find_layout(root)
  for name in layout.names[split]:
    ann, images = layout.paths(root, name)
    if os.path.isfile(ann):
      if not os.path.isdir(images):
        raise FileNotFoundError(f"{ann} is there but its image folder {images} is not "
                                f"({layout.name} layout of config.data.coco_root={root!r})")
      return ann, images
  return None
