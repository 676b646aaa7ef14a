"""What the rest of the program learns from a dataset: its classes and their category ids.

The record travels beside the config (never written into it): the model is built with its
number of classes, evaluation maps labels back to category ids, pictures name the classes. A
training run saves it in its workdir (`dataset_info.json`), so evaluation and prediction can
start from the workdir alone.
"""
import dataclasses
import json
import pathlib

FILE_NAME = "dataset_info.json"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Attributes:
    class_names: C names, index = contiguous label 0..C-1.
    category_ids: C dataset category ids, index = contiguous label (for COCO results).
  """
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]

  def __post_init__(self):
    if len(self.class_names) != len(self.category_ids):
      raise ValueError(f"{len(self.class_names)} class names but {len(self.category_ids)} "
                       "category ids")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(directory) / FILE_NAME
    path.write_text(json.dumps({"class_names": list(self.class_names),
                                "category_ids": list(self.category_ids)}, indent=1))
    return path

  @classmethod
  def load(cls, directory: str | pathlib.Path) -> "DatasetInfo":
    path = pathlib.Path(directory) / FILE_NAME
    if not path.exists():
      raise FileNotFoundError(f"{path} not found: it is written by train.py at the start of a "
                              "run; give the config and data of the run instead.")
    record = json.loads(path.read_text())
    return cls(tuple(record["class_names"]), tuple(int(i) for i in record["category_ids"]))
