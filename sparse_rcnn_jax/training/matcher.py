"""Hungarian matching of predictions to ground truth (docs/model.md, section 5).

The costs are computed on the device for every stage and image at once. A matcher is any
function with the signature of `scipy_match`

    (costs [B, ..., N, M], gt_mask [B, ..., M]) -> (pred_index [B, ..., M], match_mask [B, ..., M])

(batch axis first, then any further axes such as stages), registered in MATCHERS and chosen by
`config.loss.matcher`. `get_matcher` returns it ready to call: under a mesh, wrapped by
`per_device` so each device matches its own images (no all-gather of costs). Both matchers
solve the same problem: per block, min(N, real slots) one-to-one pairs of least total cost,
only real slots matched, non-finite costs matched only as a last resort (`_finite_block`).

  * "scipy" (the default): `scipy.optimize.linear_sum_assignment` on the host, an exact
    float64 solve, in ONE `jax.pure_callback` per device per training step. The round trip
    to the host is its cost.
  * "device": `optax.assignment.hungarian_algorithm` vmapped over the blocks, inside the
    compiled step: no host callback, for GPU/TPU pods and many processes. A float32 solve
    (ties within float32 rounding may go either way); its cubic work runs in while loops on
    the device, which on a CPU is far slower than scipy.

Why the callback's arguments are split into chunks of at most 64 KiB (`_to_chunks`): the cause
of the hangs seen with callbacks on several CPU devices (jaxlib 0.10.2, 2-core host,
--xla_force_host_platform_device_count=8), found with gdb on the hung processes:
  * `pure_callback` hands the callback `jax.Array`s made by `device_put` of the incoming NumPy
    buffers (jax/_src/callback.py, pure_callback_impl). The XLA:CPU client copies a host buffer
    larger than kSmallDataTransferByteSize (100 KiB) asynchronously, as a task on its
    async-work thread pool; reading the array in the callback waits for that task.
  * That pool has max(cores, devices) threads and also runs the devices' programs. When every
    thread is held by a device blocked in its callback (waiting for its own copy) or in a
    collective (waiting for a device still in its callback), nothing is left to run the
    copies: deadlock. Under shard_map it depends on timing, hence "1 run in 12"; under plain
    jit all devices' costs are gathered into one callback on device 0 while the other devices
    wait in the collective that returns its result: every time, once above 100 KiB.
    Threads sit in PyArray_bf_getbuffer -> Future::Await and in InProcessCommunicator; a
    callback that sleeps on one device while the others wait in a psum deadlocks with a
    104 KB argument and never with a 100 KB one.
  * An argument of at most 64 KiB is copied synchronously inside `device_put`, so the callback
    never waits on the pool, whatever the other devices are doing.
A second hazard is not the matcher's: with several devices in one CPU process, a host that
dispatches 32 or more steps without waiting fills the per-device in-flight semaphore, and the
launches blocked on it hold the pool threads that a collective's missing participants need
(it hangs without any callback). A training loop must wait on a result at least every 31
steps (the trainer reads a scalar every step).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from scipy.optimize import linear_sum_assignment

from sparse_rcnn_jax.model import box_ops

Matcher = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

# Below XLA:CPU's 100 KiB threshold for asynchronous host-to-device copies (see the module
# docstring): every callback argument is at most this many bytes.
_MAX_CALLBACK_ARG_BYTES = 64 * 1024


def focal_class_cost(logits, labels, alpha: float = 0.25, gamma: float = 2.0):
  """Focal classification cost of assigning each prediction to each ground-truth class.

  Args:
    logits: [..., N, C] raw class logits.
    labels: [..., M] int class of each ground-truth slot, 0..C-1.
  Returns:
    [..., N, M]: alpha (1-p)^g (-log(p + 1e-8)) - (1-alpha) p^g (-log(1-p + 1e-8)) with
    p = sigmoid(logit of the slot's class), as the official matcher computes it.
  """
  prob = jax.nn.sigmoid(logits)
  neg = (1 - alpha) * prob ** gamma * -jnp.log(1 - prob + 1e-8)
  pos = alpha * (1 - prob) ** gamma * -jnp.log(prob + 1e-8)
  per_class = pos - neg
  index = jnp.broadcast_to(labels[..., None, :], per_class.shape[:-1] + labels.shape[-1:])
  return jnp.take_along_axis(per_class, index, axis=-1)


def match_costs(pred_logits, pred_boxes, gt_boxes, gt_labels, image_whwh, *,
                class_weight: float, l1_weight: float, giou_weight: float,
                focal_alpha: float, focal_gamma: float):
  """The matching cost l1_weight * C_L1 + class_weight * C_cls + giou_weight * C_giou.

  Leading axes broadcast, so predictions [B, S, N, ...] pair with targets [B, 1, M, ...].

  Args:
    pred_logits: [..., N, C] raw logits.
    pred_boxes: [..., N, 4] absolute xyxy.
    gt_boxes: [..., M, 4] absolute xyxy (padded slots hold anything finite).
    gt_labels: [..., M] int classes.
    image_whwh: [..., 4] (w, h, w, h) of the unpadded image; L1 is taken on boxes / whwh.
  Returns:
    [..., N, M] costs, in the official summation order.
  """
  whwh = image_whwh[..., None, :]
  cost_l1 = jnp.sum(jnp.abs((pred_boxes / whwh)[..., :, None, :] -
                            (gt_boxes / whwh)[..., None, :, :]), axis=-1)
  cost_class = focal_class_cost(pred_logits, gt_labels, focal_alpha, focal_gamma)
  cost_giou = -box_ops.pairwise_generalized_iou(pred_boxes, gt_boxes)
  return l1_weight * cost_l1 + class_weight * cost_class + giou_weight * cost_giou


def _finite_block(block: np.ndarray) -> np.ndarray:
  """Replaces non-finite costs by a penalty that any finite alternative beats.

  scipy rejects NaN; mapping it to a plain large number could let a NaN prediction win a
  ground truth from a finite one. With hi/lo the finite extremes and m columns, a penalty
  above hi + (m - 1)(hi - lo) makes an assignment using fewer penalized entries always
  cheaper, so a non-finite pair is matched only where nothing finite is left (and then its
  loss is NaN, which the training step reports).
  """
  finite = np.isfinite(block)
  if finite.all():
    return block
  lo, hi = (block[finite].min(), block[finite].max()) if finite.any() else (0.0, 0.0)
  return np.where(finite, block, hi + block.shape[1] * (hi - lo) + 1.0)


def solve_assignments(costs: np.ndarray, gt_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The host solver: one `linear_sum_assignment` per cost block, on its valid columns.

  Args:
    costs: [K, N, M] cost blocks.
    gt_mask: [K, M] bool, which ground-truth slots exist.
  Returns:
    pred_index [K, M] int32 (the proposal matched to each slot, 0 where unmatched) and
    match_mask [K, M] bool. A block without ground truth matches nothing; with more slots
    than proposals, N of them are matched.
  """
  pred_index = np.zeros(gt_mask.shape, np.int32)
  match_mask = np.zeros(gt_mask.shape, bool)
  for k in range(costs.shape[0]):
    cols = np.flatnonzero(gt_mask[k])
    if cols.size == 0:
      continue
    rows, picked = linear_sum_assignment(_finite_block(costs[k][:, cols].astype(np.float64)))
    pred_index[k, cols[picked]] = rows
    match_mask[k, cols[picked]] = True
  return pred_index, match_mask


def _to_chunks(x: jax.Array) -> list[jax.Array]:
  """x flattened into pieces of at most _MAX_CALLBACK_ARG_BYTES (see the module docstring)."""
  flat = x.reshape(-1)
  size = max(1, _MAX_CALLBACK_ARG_BYTES // flat.dtype.itemsize)
  return [flat[i:i + size] for i in range(0, max(flat.size, 1), size)]


def _from_chunks(chunks, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of _to_chunks on the host; extra leading axes (from vmap) are kept."""
  joined = np.concatenate([np.asarray(c) for c in chunks], axis=-1)
  return joined.reshape(joined.shape[:-1] + shape)


def scipy_match(costs: jax.Array, gt_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Minimum-cost one-to-one matching of each block, solved on the host in one round trip.

  Args:
    costs: [..., N, M] (e.g. [B, S, N, M]: every image and stage); no gradient flows.
    gt_mask: [..., M] bool.
  Returns:
    pred_index [..., M] int32: for each ground-truth slot, the proposal it got;
    match_mask [..., M] bool: whether the slot was matched (False for padding).
  """
  lead, (n, m) = costs.shape[:-2], costs.shape[-2:]
  k = int(np.prod(lead, dtype=np.int64))
  costs = jax.lax.stop_gradient(costs).astype(jnp.float32)
  cost_chunks, mask_chunks = _to_chunks(costs), _to_chunks(gt_mask)

  def host(cost_chunks, mask_chunks):
    c = _from_chunks(cost_chunks, (k, n, m))
    g = _from_chunks(mask_chunks, (k, m))
    extra = c.shape[:-3]
    index, mask = solve_assignments(c.reshape(-1, n, m), g.reshape(-1, m))
    return index.reshape(extra + lead + (m,)), mask.reshape(extra + lead + (m,))

  out = (jax.ShapeDtypeStruct(lead + (m,), jnp.int32), jax.ShapeDtypeStruct(lead + (m,), bool))
  # broadcast_all: under vmap every argument arrives with the same leading vmapped axes, which
  # `host` keeps in front, so a vmapped loss still makes one host round trip ("sequential"
  # would make one per element; "expand_dims" would leave unbatched arguments with size-1
  # axes to broadcast on the host).
  return jax.pure_callback(host, out, cost_chunks, mask_chunks, vmap_method="broadcast_all")


def _above(top: jax.Array) -> jax.Array:
  """A float32 strictly above `top`, by at least 1 (by more where 1 is below its precision)."""
  return top + jnp.maximum(1.0, jnp.abs(top) * 2.0 ** -20)


def _negative_block(costs: jax.Array, gt_mask: jax.Array) -> jax.Array:
  """One block as the device solver takes it: real slots below 0, padded slots exactly 0.

  Real entries are `_finite_block`'s (a non-finite cost becomes its penalty), all lowered by
  one constant just above the largest of them. The solver assigns min(N, M) pairs; a pair
  (i, padded slot) while a real slot j is free would cost more than (i, j), so at the optimum
  the real pairs number min(N, real slots) and are the cheapest such pairs (the shift adds
  the same to every choice of that size). No big-M constant is needed (in float32, a big M
  added to a cost would round its digits away).

  Args:
    costs: [N, M] float32.
    gt_mask: [M] bool.
  Returns:
    [N, M] float32.
  """
  real = jnp.broadcast_to(gt_mask, costs.shape)
  finite = jnp.isfinite(costs) & real
  any_finite = jnp.any(finite)
  lo = jnp.where(any_finite, jnp.min(costs, where=finite, initial=jnp.inf), 0.0)
  hi = jnp.where(any_finite, jnp.max(costs, where=finite, initial=-jnp.inf), 0.0)
  penalty = hi + jnp.sum(gt_mask) * (hi - lo) + 1.0
  top = jnp.where(jnp.all(finite == real), hi, penalty)
  return jnp.where(real, jnp.where(finite, costs, penalty) - _above(top), 0.0)


def _device_block(costs: jax.Array, gt_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`solve_assignments` of one block [N, M] with gt_mask [M], on the device."""
  rows, cols = optax.assignment.hungarian_algorithm(_negative_block(costs, gt_mask))
  matched = gt_mask[cols]
  pred_index = jnp.zeros(gt_mask.shape, jnp.int32).at[cols].set(
      jnp.where(matched, rows, 0).astype(jnp.int32))
  return pred_index, jnp.zeros(gt_mask.shape, bool).at[cols].set(matched)


def device_match(costs: jax.Array, gt_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The matching of `scipy_match`, solved on the device in float32 (no host callback).

  Args:
    costs: [..., N, M] (e.g. [B, S, N, M]); no gradient flows.
    gt_mask: [..., M] bool.
  Returns:
    pred_index [..., M] int32 (0 where unmatched) and match_mask [..., M] bool.
  """
  lead, (n, m) = costs.shape[:-2], costs.shape[-2:]
  k = int(np.prod(lead, dtype=np.int64))
  costs = jax.lax.stop_gradient(costs).astype(jnp.float32).reshape((k, n, m))
  pred_index, match_mask = jax.vmap(_device_block)(costs, gt_mask.reshape(k, m))
  return pred_index.reshape(lead + (m,)), match_mask.reshape(lead + (m,))


MATCHERS: dict[str, Matcher] = {"scipy": scipy_match, "device": device_match}


def per_device(matcher: Matcher, mesh: Mesh, axis: str) -> Matcher:
  """`matcher` run by each device on its own images: the batch axis (0) is split over `axis`.

  Each device sees only its local [B / devices, ...] blocks: no device gathers another's cost
  matrices, the host matcher makes one round trip per device, and the device matcher's while
  loops run on their own (partitioned by the jit instead, every iteration of every loop would
  wait for an all-reduce of the loop condition over all devices). Every mesh axis is manual
  inside (callbacks require it); devices along other axes repeat their group's matching.
  check_vma is off because optax's while loops start from constants that do not vary over
  `axis` and so fail the check, though every device's loop is its own.
  """
  spec = P(axis)
  return jax.shard_map(matcher, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec),
                       check_vma=False)


def get_matcher(name: str, mesh: Mesh | None = None, axis: str = "data") -> Matcher:
  """The matcher registered under `name` (config.loss.matcher), ready to call.

  Args:
    name: a key of MATCHERS.
    mesh: the mesh whose `axis` splits the batch (the matcher then runs per device), or None.
    axis: the mesh axis of the batch.
  """
  if name not in MATCHERS:
    raise ValueError(f"Unknown matcher {name!r} (config.loss.matcher); "
                     f"expected one of {sorted(MATCHERS)}")
  return MATCHERS[name] if mesh is None else per_device(MATCHERS[name], mesh, axis)
