"""From a dataset source to host batches: epoch plans, grain loading, each host's share.

Usage (config.data as in `config.py`):
  train_source = pipeline.load_source(config.data, "train")
  batches = pipeline.train_iterator(config.data, train_source,       # host NumPy batches
                                    jax.process_index(), jax.process_count(),
                                    size_divisibility=model.backbone.size_divisibility)
  state = batches.get_state()  ...  batches.set_state(state)
The device side (global jax.Arrays, prefetching to the devices) is device_batches.py's: this
package never imports JAX.

Train iterator: infinite. Epoch e shuffles the N images with np.random.default_rng([seed, e]),
draws from the same generator each image's augmentation numbers, predicts every image's output
size (transforms.sample_params; no decoding) and, with group_by_aspect, makes each global batch
all-landscape or all-portrait (leftovers of both pooled), then shuffles the batch order. An
epoch has floor(N / batch_size) batches; which images are left over changes every epoch.
Hosts: every host plans the same global batches and reads its own slots
[p * B, (p + 1) * B) with B = batch_size / process_count, so all hosts pad a step to the same
bucket without communicating (the bucket is chosen from the predicted sizes of the whole global
batch). Without sizes known up front (some TFDS sets) a single host pads to its own batch and
several hosts pad to the largest bucket.
Resuming: the iterator is grain's; `get_state()` / `set_state()` exchange a small dict (how many
batches were read, per worker). The plan is a pure function of (seed, batch index), so a restored
iterator continues with exactly the batches the interrupted run would have read. Every host reads
as many batches of the same plan, so one host's state serves all: the trainer saves it as JSON
beside the train state (checkpointing.py). Restore it with the same num_workers.

Eval iterator: one pass over every image exactly once, in dataset order (grouped by orientation
when group_by_aspect), global batches split across hosts as above, the last one completed with
empty slots (valid False); every host yields the same number of batches.

Bad images: the plan never depends on which files decode. An image that fails under
on_bad_image="skip" becomes an empty slot of its batch (batching.py), so the good images seen,
their order and their augmentation, and resuming, are those of a run where it was good;
SkipReport logs one summary per epoch of the slots left empty.

Workers: grain runs loading in `num_workers` spawned processes, or with 0 in `read_threads`
threads of this process. Spawned workers re-import the main module: a script that iterates
with workers needs the `if __name__ == "__main__":` guard (absl.app programs have it). grain
reads its absl flags there, so outside absl.app (a notebook, pytest) call
`absl.flags.FLAGS.mark_as_parsed()` first; the flags are the program's, never set here.
"""
import collections
import dataclasses
import sys
from typing import Any, Iterable, Iterator, Sequence

from absl import logging
import grain
import ml_collections
import numpy as np

from sparse_rcnn_jax.data import batching
from sparse_rcnn_jax.data import coco
from sparse_rcnn_jax.data import layout
from sparse_rcnn_jax.data import source as source_lib
from sparse_rcnn_jax.data import synthetic
from sparse_rcnn_jax.data import transforms

Batch = dict[str, np.ndarray]
Shape = tuple[int, int]


def _tfds_source(data: ml_collections.ConfigDict, split: str) -> source_lib.DetectionSource:
  # Imported here: tensorflow_datasets takes a second to import and COCO folders do not need it.
  from sparse_rcnn_jax.data import tfds  # pylint: disable=g-import-not-at-top
  return tfds.TfdsSource.from_config(data, split)


# config.data.source -> (data config, split) -> source. A new kind of dataset is one
# DetectionSource class (source.py) with a `from_config` and one entry here.
SOURCES = {
    "coco": coco.CocoSource.from_config,
    "tfds": _tfds_source,
    "synthetic": synthetic.SyntheticSource.from_config,
}


def load_source(config: ml_collections.ConfigDict, split: str) -> source_lib.DetectionSource:
  """The dataset of split "train" or "eval" named by config.data (config.data.source).

  Raises:
    DataError: a training split without any box (unless config.data.allow_empty_train), or
      the problems the source's own checks found (coco.py).
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if config.source not in SOURCES:
    raise ValueError(f"config.data.source must be one of {sorted(SOURCES)}, got "
                     f"{config.source!r}")
  source = SOURCES[config.source](config, split)
  if source.num_boxes is not None:
    empty = source_lib.empty_training_split(
        split, int(source.num_boxes.sum()), len(source),
        getattr(source, "ann_path", config.source), config.get("allow_empty_train", False))
    if empty:
      raise source_lib.DataError(empty)
  return source


def has_eval_split(config: ml_collections.ConfigDict) -> bool:
  """Whether config.data names an evaluation split."""
  if config.source == "coco":
    return layout.coco_split(config, "eval") is not None
  return config.source != "tfds" or bool(config.tfds_name)


def augment_config(config: ml_collections.ConfigDict, split: str) -> transforms.AugmentConfig:
  """Training augmentation, or the test resize for split "eval"."""
  if split == "eval":
    return transforms.AugmentConfig(scales=(config.test_scale,), max_size=config.max_size)
  return transforms.AugmentConfig(
      scales=tuple(config.train_scales), max_size=config.max_size, flip_prob=config.flip_prob,
      crop_prob=config.crop_prob if config.crop else 0.0, crop_scales=tuple(config.crop_scales),
      crop_size=tuple(config.crop_size))


def batch_shapes(config: ml_collections.ConfigDict, split: str = "train", *,
                 size_divisibility: int) -> list[Shape]:
  """The (H, W) shapes batches of a split may have: the shapes a jitted step compiles for,
  multiples of the backbone's `size_divisibility`."""
  if config.buckets:
    shapes = sorted({(int(h), int(w)) for h, w in config.buckets})
    bad = [s for s in shapes if min(s) <= 0 or s[0] % size_divisibility
           or s[1] % size_divisibility]
    if bad:
      raise ValueError(f"config.data.buckets {bad} must be positive multiples of "
                       f"{size_divisibility}, the backbone's coarsest stride")
    return shapes
  max_short = max(config.train_scales) if split == "train" else config.test_scale
  return list(batching.default_buckets(max_short, config.max_size, size_divisibility))


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  """One host's slots of a global batch.

  Attributes:
    indices: int64 [B] source indices; -1 for an empty slot.
    uniforms: float64 [B, NUM_UNIFORMS] augmentation numbers.
    min_shape: (H, W) the batch is padded to at least (its bucket when sizes are known).
    epoch: the training epoch it belongs to (0 for evaluation).
  """
  indices: np.ndarray
  uniforms: np.ndarray
  min_shape: Shape
  epoch: int = 0


class Planner:
  """What is common to the train and eval plans: hosts, predicted sizes, bucket per batch."""

  def __init__(self, source: source_lib.DetectionSource, config: ml_collections.ConfigDict,
               split: str, global_batch: int, process_index: int, process_count: int,
               resize: tuple[transforms.AugmentConfig, Sequence[Shape]] | None = None, *,
               size_divisibility: int):
    if global_batch % process_count:
      raise ValueError(f"The global {split} batch size {global_batch} does not divide by the "
                       f"{process_count} hosts")
    self.num_images = len(source)
    self.sizes = source.image_sizes
    if resize is None:
      self.augment = augment_config(config, split)
      self.buckets = batch_shapes(config, split, size_divisibility=size_divisibility)
    else:
      self.augment, self.buckets = resize[0], list(resize[1])
    self.group = config.group_by_aspect and self.sizes is not None
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.first_slot = process_index * self.local_batch
    # Without predicted sizes, hosts cannot agree on a bucket unless it is the largest one.
    largest = max(self.buckets, key=lambda b: (b[0] * b[1], b))
    self.unknown_shape = (0, 0) if process_count == 1 else largest

  def out_sizes(self, uniforms: np.ndarray) -> np.ndarray | None:
    """int [N, 2] (h, w) of every augmented image, or None when sizes are unknown."""
    if self.sizes is None:
      return None
    p = transforms.sample_params(self.sizes[:, 0], self.sizes[:, 1], uniforms, self.augment)
    return np.stack([p.out_h, p.out_w], axis=1)

  def buckets_of(self, batches: np.ndarray, out_sizes: np.ndarray | None) -> list[Shape]:
    """The bucket of each global batch [K, global_batch] (-1 = empty slot)."""
    if out_sizes is None:
      return [self.unknown_shape] * len(batches)
    sizes = np.where((batches >= 0)[..., None], out_sizes[batches], 0)
    return [batching.select_bucket(h, w, self.buckets) for h, w in sizes.max(axis=1)]

  def local(self, batch: np.ndarray, uniforms: np.ndarray, shape: Shape,
            epoch: int = 0) -> PlannedBatch:
    indices = batch[self.first_slot:self.first_slot + self.local_batch]
    return PlannedBatch(indices=indices, uniforms=uniforms[np.maximum(indices, 0)],
                        min_shape=shape, epoch=epoch)


def _group_by_orientation(order: np.ndarray, portrait: np.ndarray, batch_size: int,
                          rng: np.random.Generator) -> np.ndarray:
  """[len(order) // batch_size, batch_size] batches, each of one orientation where possible.

  The epoch leaves out the last len(order) % batch_size images of the shuffled order, whatever
  their orientation (so an orientation with fewer images than a batch is not always the one
  left out); the others keep their shuffled order within each orientation; the leftovers of
  both orientations make the (at most one) mixed batch; the batch order is shuffled.
  """
  order = order[:len(order) // batch_size * batch_size]
  full, rest = [], []
  for group in (order[~portrait[order]], order[portrait[order]]):
    n = len(group) // batch_size * batch_size
    full.append(group[:n].reshape(-1, batch_size))
    rest.append(group[n:])
  rest = np.concatenate(rest)
  full.append(rest[:len(rest) // batch_size * batch_size].reshape(-1, batch_size))
  batches = np.concatenate(full)
  return batches[rng.permutation(len(batches))]


class TrainPlan(Sequence[PlannedBatch]):
  """The infinite sequence of this host's training batches (module docstring)."""

  def __init__(self, planner: Planner, seed: int):
    self.planner, self.seed = planner, seed
    self.batches_per_epoch = planner.num_images // planner.global_batch
    if not self.batches_per_epoch:
      raise ValueError(f"The training set has {planner.num_images} images, fewer than the "
                       f"global batch size {planner.global_batch}")
    self._cache = None

  def __len__(self) -> int:
    return sys.maxsize

  def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, list[Shape]]:
    """(global batches [K, global_batch] of indices, uniforms [N, U], bucket per batch)."""
    cache = self._cache
    if cache is not None and cache[0] == epoch:
      return cache[1]
    rng = np.random.default_rng([self.seed, epoch])
    n, size = self.planner.num_images, self.planner.global_batch
    order = rng.permutation(n)
    uniforms = rng.random((n, transforms.NUM_UNIFORMS))
    out_sizes = self.planner.out_sizes(uniforms)
    if self.planner.group:
      batches = _group_by_orientation(order, out_sizes[:, 0] > out_sizes[:, 1], size, rng)
    else:
      batches = order[:self.batches_per_epoch * size].reshape(-1, size)
    plan = (batches, uniforms, self.planner.buckets_of(batches, out_sizes))
    self._cache = (epoch, plan)
    return plan

  def __getitem__(self, step: int) -> PlannedBatch:
    epoch, k = divmod(int(step), self.batches_per_epoch)
    batches, uniforms, shapes = self.epoch(epoch)
    return self.planner.local(batches[k], uniforms, shapes[k], epoch)

  def __getstate__(self) -> dict[str, Any]:
    # Workers rebuild their own cache rather than receive a pickled epoch.
    return {**self.__dict__, "_cache": None}


class EvalPlan(Sequence[PlannedBatch]):
  """One ordered pass over all images; the last global batch completed with empty slots."""

  def __init__(self, planner: Planner):
    self.planner = planner
    n, size = planner.num_images, planner.global_batch
    uniforms = np.zeros((n, transforms.NUM_UNIFORMS))
    out_sizes = planner.out_sizes(uniforms)
    order = np.arange(n)
    if planner.group:
      order = np.argsort(out_sizes[:, 0] > out_sizes[:, 1], kind="stable")
    padded = np.full(-(-n // size) * size, -1, np.int64)
    padded[:n] = order
    self.batches = padded.reshape(-1, size)
    self.uniforms = uniforms
    self.shapes = planner.buckets_of(self.batches, out_sizes)

  def __len__(self) -> int:
    return len(self.batches)

  def __getitem__(self, k: int) -> PlannedBatch:
    if not 0 <= k < len(self):
      raise IndexError(k)
    return self.planner.local(self.batches[k], self.uniforms, self.shapes[k])


# Keys a loaded batch carries for the host only (make_global_batch leaves them out):
#   skipped: int64 [B] source index of a slot left empty because its image could not be
#     decoded (on_bad_image="skip"), else -1.   epoch: int64 [B] the plan's epoch.
#   source_index: int64 [B] the source index planned for each slot (-1 for padding), so the
#     original image of a prediction can be read back (source.example).
HOST_KEYS = ("skipped", "epoch", "source_index")


class BatchLoader:
  """PlannedBatch -> batch dict: decode, augment, pad (runs in grain workers).

  An image that fails to decode under on_bad_image="skip" leaves its slot empty; its reason is
  logged the first time this process meets it, and the batch names it in "skipped" (HOST_KEYS)
  for SkipReport's per-epoch summary. Nothing else changes: the plan, and so every other slot,
  is the same as if the image were good.
  """

  def __init__(self, source: source_lib.DetectionSource, augment: transforms.AugmentConfig,
               buckets: Sequence[Shape], max_boxes: int, on_bad_image: str):
    self.source, self.augment, self.buckets = source, augment, list(buckets)
    self.max_boxes, self.on_bad_image = max_boxes, on_bad_image
    self.warned = set()

  def example(self, index: int, uniforms: np.ndarray) -> source_lib.Example | None:
    """The augmented image `index`, or None for a slot left empty."""
    if index < 0:
      return None
    try:
      ex = self.source.example(int(index))
    except source_lib.BadImageError as e:
      if self.on_bad_image == "error":
        raise
      if index not in self.warned:
        self.warned.add(index)
        logging.warning("%s; left out (on_bad_image='skip'; counted once per epoch)", e)
      return None
    h, w = ex.image.shape[:2]
    return transforms.augment(ex, transforms.sample_params(h, w, uniforms, self.augment))

  def __call__(self, plan: PlannedBatch) -> Batch:
    examples = [self.example(i, u) for i, u in zip(plan.indices, plan.uniforms)]
    height, width = plan.min_shape
    for ex in examples:
      if ex is not None:
        height, width = max(height, ex.image.shape[0]), max(width, ex.image.shape[1])
    bucket = batching.select_bucket(height, width, self.buckets)
    batch = batching.collate(examples, bucket, self.max_boxes)
    batch["skipped"] = np.array([i if i >= 0 and ex is None else -1
                                 for i, ex in zip(plan.indices, examples)], np.int64)
    batch["epoch"] = np.full(len(examples), plan.epoch, np.int64)
    batch["source_index"] = np.asarray(plan.indices, np.int64)
    return batch


class SkipReport:
  """Counts the images left empty for failing to decode (a batch's "skipped") and logs one
  summary per epoch, and one at `close()`, instead of a warning per draw."""

  def __init__(self, source: source_lib.DetectionSource, split: str):
    self.source, self.split = source, split
    self.epoch, self.counts, self.total = None, collections.Counter(), 0

  def _name(self, index: int) -> str:
    table = getattr(self.source, "table", None)
    return table.file_names[index] if table is not None else f"source index {index}"

  def _flush(self) -> None:
    if self.counts:
      names = ", ".join(self._name(i) for i in sorted(self.counts)[:5])
      more = len(self.counts) - 5
      logging.warning("%s epoch %d: %d draws of %d images left empty, as they cannot be decoded "
                      "(on_bad_image='skip')%s: %s%s", self.split, self.epoch,
                      sum(self.counts.values()), len(self.counts),
                      "; their boxes count as missed in AP" if self.split == "eval" else "",
                      names, f" and {more} more" if more > 0 else "")
    self.counts.clear()

  def add(self, batch: Batch) -> None:
    epoch = int(batch["epoch"][0]) if len(batch["epoch"]) else 0
    if epoch != self.epoch:
      self._flush()
      self.epoch = epoch
    skipped = batch["skipped"][batch["skipped"] >= 0]
    self.counts.update(int(i) for i in skipped)
    self.total += len(skipped)

  def close(self) -> None:
    """Logs the current epoch's summary (at the end of a run or of an evaluation pass)."""
    self._flush()

  def follow(self, batches: Iterable[Batch]) -> Iterator[Batch]:
    """`batches`, counted as they pass; the summary is logged when they run out."""
    for batch in batches:
      self.add(batch)
      yield batch
    self.close()


def _check_max_boxes(source: source_lib.DetectionSource, max_boxes: int) -> None:
  if source.num_boxes is not None and len(source) and source.num_boxes.max() > max_boxes:
    worst = int(np.argmax(source.num_boxes))
    raise ValueError(f"An image has {source.num_boxes[worst]} boxes (source index {worst}), more "
                     f"than config.data.max_boxes={max_boxes}; raise max_boxes")


def _iterate(plan: Sequence[PlannedBatch], loader: BatchLoader,
             config: ml_collections.ConfigDict) -> grain.DatasetIterator:
  dataset = grain.MapDataset.source(plan).map(loader).to_iter_dataset(
      grain.ReadOptions(num_threads=config.read_threads,
                        prefetch_buffer_size=max(config.prefetch, config.read_threads)))
  if config.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers, per_worker_buffer_size=config.prefetch))
  return iter(dataset)


def _make(config: ml_collections.ConfigDict, source: source_lib.DetectionSource, split: str,
          process_index: int, process_count: int,
          resize: tuple[transforms.AugmentConfig, Sequence[Shape]] | None,
          size_divisibility: int) -> tuple[Planner, BatchLoader]:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not one of {process_count} processes")
  _check_max_boxes(source, config.max_boxes)
  batch = config.batch_size if split == "train" else config.eval_batch_size
  planner = Planner(source, config, split, batch, process_index, process_count, resize,
                    size_divisibility=size_divisibility)
  loader = BatchLoader(source, planner.augment, planner.buckets, config.max_boxes,
                       config.on_bad_image)
  logging.info("%s batches: %d images, global batch %d (%d on this host), %d shapes %s%s",
               split, len(source), batch, planner.local_batch, len(planner.buckets),
               planner.buckets, ", grouped by orientation" if planner.group else "")
  return planner, loader


def train_iterator(config: ml_collections.ConfigDict, source: source_lib.DetectionSource,
                   process_index: int = 0, process_count: int = 1, *,
                   size_divisibility: int) -> grain.DatasetIterator:
  """Infinite, shuffled, augmented host batches (batching.py); resumable via get/set_state.

  This host's share of each global batch: on several hosts, pass jax.process_index() and
  jax.process_count() (the defaults are one host; tests pass others to simulate hosts). Images
  are padded to multiples of `size_divisibility` (the backbone's).
  """
  planner, loader = _make(config, source, "train", process_index, process_count, None,
                          size_divisibility)
  return _iterate(TrainPlan(planner, config.seed), loader, config)


def eval_iterator(config: ml_collections.ConfigDict, source: source_lib.DetectionSource,
                  process_index: int = 0, process_count: int = 1,
                  resize: tuple[transforms.AugmentConfig, Sequence[Shape]] | None = None, *,
                  size_divisibility: int) -> grain.DatasetIterator:
  """One ordered pass of test-resized host batches, the last completed with valid=False.

  This host's share of each global batch, as for train_iterator.

  `resize` = (AugmentConfig, bucket shapes) resizes and pads otherwise than the config's test
  resize (test-time augmentation evaluates at several scales: tta.py); images are padded to
  multiples of `size_divisibility` (the backbone's).
  """
  planner, loader = _make(config, source, "eval", process_index, process_count, resize,
                          size_divisibility)
  return _iterate(EvalPlan(planner), loader, config)
