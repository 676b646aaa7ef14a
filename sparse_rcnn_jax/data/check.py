"""Checks a config's dataset before training on it, and reports every problem at once.

  python -m sparse_rcnn_jax.data.check --config configs/custom.py --config.data.coco_root=DIR
  python -m sparse_rcnn_jax.data.check --config ... --decode     # decode every image too

Training runs the same check (config.data.check, "headers" by default) when it loads the data,
before building or compiling the model; this command runs it alone and reports everything
(bad image files, bad annotations, boxes clipped, images and boxes per split) instead of
stopping. Exit status 1 when the config's policies (data.on_bad_image, data.on_bad_annotation)
would stop training, or the training split has no box; 0 otherwise, problems that would be
skipped listed as warnings.
"""
import dataclasses
import sys
import time

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from sparse_rcnn_jax.data import coco
from sparse_rcnn_jax.data import layout
from sparse_rcnn_jax.data import source as source_lib


@dataclasses.dataclass(frozen=True)
class SplitReport:
  """The check of one split.

  Attributes:
    split: "train" or "eval".
    scan: what coco.scan_coco found.
    seconds: how long the check took.
    fatal: the problems that stop training under the config's policies (empty if none).
  """
  split: str
  scan: coco.CocoScan
  seconds: float
  fatal: tuple[str, ...]

  def text(self) -> str:
    t = self.scan.table
    lines = [f"{self.split}: {t.ann_path} (images in {t.image_dir})",
             f"  {len(t.image_ids)} of {self.scan.num_images} images usable, {len(t.labels)} "
             f"boxes ({int(t.is_crowd.sum())} of them crowd), {len(t.class_names)} classes; "
             f"checked in {self.seconds:.2f} s"]
    if t.num_clipped:
      lines.append(f"  {t.num_clipped} boxes crossing the image border by more than "
                   f"{coco.BOX_TOLERANCE:g} px clipped (on_bad_annotation='skip')")
    if self.scan.image_problems:
      lines.append(self.scan.image_report())
    if self.scan.annotation_problems:
      lines.append(self.scan.annotation_report())
    for problem in self.fatal:
      lines.append(f"  STOPS TRAINING: {problem}")
    if not (self.scan.image_problems or self.scan.annotation_problems or self.fatal):
      lines.append("  no problems")
    return "\n".join(lines)


def check_split(data: ml_collections.ConfigDict, split: str,
                mode: str | None = None) -> SplitReport | None:
  """Checks split "train" or "eval" of a COCO-format `config.data`; None when the split is not
  named. `mode` overrides data.check ("headers", "decode", "off")."""
  paths = layout.coco_split(data, split)
  if paths is None:
    return None
  start = time.perf_counter()
  scan = coco.scan_coco(*paths, clip=data.on_bad_annotation == "skip",
                        check=mode or data.get("check", "headers"))
  seconds = time.perf_counter() - start
  problems = {"image": scan.image_problems, "annotation": scan.annotation_problems}
  fatal = [f"{problems[kind].total} bad {kind}s under on_bad_{kind}='error'"
           for kind in coco.stopping_problems(scan, data.on_bad_image, data.on_bad_annotation)]
  empty = source_lib.empty_training_split(
      split, int(np.count_nonzero(~scan.table.is_crowd)), len(scan.table.image_ids), paths[0],
      data.get("allow_empty_train", False))
  if empty:
    fatal.append(empty)
  return SplitReport(split, scan, seconds, tuple(fatal))


def check(data: ml_collections.ConfigDict, mode: str | None = None) -> list[SplitReport]:
  """Checks every split `config.data` names (COCO-format sources only)."""
  if data.source != "coco":
    raise ValueError(f"The check reads COCO-format folders; config.data.source is "
                     f"{data.source!r} (its sources validate their data when loaded)")
  reports = [check_split(data, split, mode) for split in layout.SPLITS]
  if reports[0] is None:
    raise ValueError("No training split: set config.data.coco_root, or config.data.train_ann "
                     "and config.data.train_images")
  return [r for r in reports if r is not None]


def main(data: ml_collections.ConfigDict, decode: bool) -> int:
  """Prints the reports of `data`'s splits; returns the exit status (module docstring). A
  dataset that cannot be read at all (a cut-off json, duplicate image ids, ...) gets its message
  on stderr and status 1."""
  try:
    reports = check(data, "decode" if decode else None)
  except (source_lib.DataError, ValueError, OSError) as error:
    print(error, file=sys.stderr)
    return 1
  print("\n\n".join(r.text() for r in reports))
  return 1 if any(r.fatal for r in reports) else 0


def _command_line() -> None:
  """`python -m sparse_rcnn_jax.data.check`: its flags are defined here, not at import."""
  config = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                           lock_config=False)
  decode = flags.DEFINE_bool("decode", False, "Decode every image (slower) rather than read "
                             "headers and file ends only.")
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: sys.exit(main(config.value.data, decode.value)))


if __name__ == "__main__":
  _command_line()
