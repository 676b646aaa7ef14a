"""Checkpoints: what is saved comes back, the newest `keep` stay, any kept step restores."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.training import checkpointing

# One optimizer object: it is a static field of the state, part of the tree's structure. Wrapped
# like optim.make_optimizer's, so the state also holds int and bool scalars.
TX = optax.apply_if_finite(optax.adam(1e-3), max_consecutive_errors=3)


def tiny_state(seed: int) -> train_state.TrainState:
  """A small TrainState with Adam moments, an int step and a nested params tree."""
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
            "scale": jnp.asarray(rng.normal(), jnp.float32)}
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=TX)
  grads = jax.tree.map(jnp.ones_like, params)
  return state.apply_gradients(grads=grads).replace(step=jnp.asarray(seed, jnp.int32))


def data_state(step: int) -> dict:
  """Like a grain iterator's state: nested, with ints, strings and lists."""
  return {"batches_read": step, "workers": [{"next": step * 2}, {"next": step * 2 + 1}],
          "name": f"epoch-{step}"}


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves(a), leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def save_steps(workdir, steps, keep):
  manager = checkpointing.make_manager(workdir, keep)
  for step in steps:
    assert checkpointing.save(manager, step, tiny_state(step), data_state(step))
  manager.wait_until_finished()
  return manager


def test_save_then_restore_gives_the_same_state_and_data_position(tmp_path):
  manager = save_steps(tmp_path, [3], keep=2)
  assert (tmp_path / "checkpoints").is_dir()
  manager.close()

  manager = checkpointing.make_manager(tmp_path, keep=2)     # a fresh process would do this
  target = checkpointing.abstract_like(tiny_state(0))
  state, data = checkpointing.restore(manager, target)
  manager.close()
  assert_same(state, tiny_state(3))
  assert int(state.step) == 3
  assert data == data_state(3)


def test_keep_leaves_the_newest_and_any_kept_step_restores(tmp_path):
  manager = save_steps(tmp_path, [1, 2, 3, 4, 5], keep=2)
  assert manager.all_steps() == [4, 5]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "5"]
  target = checkpointing.abstract_like(tiny_state(0))
  state, data = checkpointing.restore(manager, target, step=4)
  assert_same(state, tiny_state(4))
  assert data == data_state(4)
  state, data = checkpointing.restore(manager, target)      # the latest
  assert_same(state, tiny_state(5))
  assert data == data_state(5)
  manager.close()


def test_restore_without_a_checkpoint_is_none(tmp_path):
  manager = checkpointing.make_manager(tmp_path, keep=3)
  assert checkpointing.restore(manager, checkpointing.abstract_like(tiny_state(0))) is None
  manager.close()


def test_abstract_like_keeps_shapes_dtypes_and_shardings():
  mesh = sharding.make_mesh()
  state = jax.device_put(tiny_state(1), sharding.replicated(mesh))
  abstract = checkpointing.abstract_like(state)
  for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)


def test_restore_places_arrays_with_the_target_sharding(tmp_path):
  mesh = sharding.make_mesh()
  manager = save_steps(tmp_path, [7], keep=1)
  target = checkpointing.abstract_like(jax.device_put(tiny_state(0), sharding.replicated(mesh)))
  state, _ = checkpointing.restore(manager, target)
  manager.close()
  for x in jax.tree.leaves(state):
    assert x.sharding.is_equivalent_to(sharding.replicated(mesh), x.ndim)
  assert_same(state, tiny_state(7))
