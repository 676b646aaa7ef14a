"""From host batches (data/pipeline.py) to global device arrays split over the mesh, and
prefetching them to the devices: the host-to-device step of training and inference.

  batches = pipeline.train_iterator(config.data, source, jax.process_index(),
                                    jax.process_count(), size_divisibility=...)
  device_batches = device_batches.DevicePrefetch(batches, mesh)     # global jax.Arrays
  state = device_batches.get_state()  ...  device_batches.set_state(state)
"""
import collections
from typing import Any, Iterator

import grain
import jax

from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.data import pipeline


def make_global_batch(batch: pipeline.Batch, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host-local batch -> global jax.Arrays split along the mesh's data axis
  (sharding.batch_sharded).

  Every host passes its own B examples; the global arrays hold process_count * B. The
  host-only keys (pipeline.HOST_KEYS) stay behind.
  """
  batch_sharding = sharding.batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v)
          for k, v in batch.items() if k not in pipeline.HOST_KEYS}


class DevicePrefetch(Iterator[dict[str, jax.Array]]):
  """Global device batches, `size` batches transferred ahead of use.

  get_state() / set_state() are the host iterator's, as of the last batch handed out (not of
  the batches waiting on the devices), so a checkpoint resumes exactly after it.
  """

  def __init__(self, batches: grain.DatasetIterator, mesh: jax.sharding.Mesh, size: int = 2,
               skips: pipeline.SkipReport | None = None):
    self._batches, self._mesh, self._size = batches, mesh, size
    self._queue = collections.deque()
    self._state = batches.get_state()
    self.skips = skips

  def __next__(self) -> dict[str, jax.Array]:
    while len(self._queue) <= self._size:
      try:
        batch = next(self._batches)
      except StopIteration:
        break
      # Of the host batch only its host keys are kept: the images are on their way to the devices.
      self._queue.append((make_global_batch(batch, self._mesh), self._batches.get_state(),
                          {k: batch[k] for k in pipeline.HOST_KEYS}))
    if not self._queue:
      raise StopIteration
    batch, self._state, host_keys = self._queue.popleft()
    if self.skips is not None:
      self.skips.add(host_keys)
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    self._batches.set_state(state)
    self._queue.clear()
    self._state = state
