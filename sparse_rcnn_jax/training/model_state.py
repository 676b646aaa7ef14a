"""The model's state: built, initialized and restored in one place for every program.

Training builds a fresh `TrainState` (random weights, then any pretrained weights the config
names, then those of `model.init_from`, and the optimizer of optim.py) with `new_state`;
evaluation, prediction and resuming restore one from a checkpoint against `abstract_state`, the
shapes of what `new_state` builds, computed by the same code without allocating it.
"""
import dataclasses
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from flax.training import train_state

from sparse_rcnn_jax import run_files
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.convert import checkpoint_io
from sparse_rcnn_jax.convert import name_table
from sparse_rcnn_jax.data import info as info_lib
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.model import official
from sparse_rcnn_jax.model.head_config import HeadConfig
from sparse_rcnn_jax.training import checkpointing
from sparse_rcnn_jax.training import ema
from sparse_rcnn_jax.training import init_from as init_from_lib
from sparse_rcnn_jax.training import optim

log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
  """flax's TrainState plus the frozen batch-norm statistics, the RNG and the parameters' moving
  average (ema.py; {} when the run keeps none). The count of updates skipped in a row for a
  non-finite loss or gradient lives in `opt_state` (optim.py)."""
  batch_stats: Any = None
  rng: jax.Array = None  # raw key data (uint32), checkpointable as an array
  ema_params: Any = None

  def eval_variables(self, use_ema: bool = True) -> dict:
    """{"params", "batch_stats"} to evaluate: the moving average of the parameters when the
    run keeps one and `use_ema`, else the parameters themselves."""
    params = self.ema_params if use_ema and self.ema_params else self.params
    return {"params": params, "batch_stats": self.batch_stats}


def _random_variables(model, rng) -> dict:
  """model.init on one image of a small fixed size, a multiple of the backbone's stride: no
  parameter's shape or value depends on the image size, and a small image compiles fast."""
  side = 2 * model.backbone.size_divisibility
  images = jnp.zeros((1, side, side, 3), jnp.uint8)
  return model.init(rng, images, jnp.ones((1, 4), jnp.float32))


def init_variables(model: detector.SparseRCNN, config: ml_collections.ConfigDict,
                   rng: jax.Array, workdir: str | pathlib.Path | None = None) -> dict:
  """Randomly initialized variables, then the pretrained backbone weights the config names, if
  any, then every tensor of `model.init_from` whose path and shape fit (init_from.py; what was
  loaded and what not is logged). `workdir` is the run's own, which init_from may not name."""
  init_from = (_init_from_path(config.model.init_from, workdir) if config.model.init_from
               else None)
  weights = config.model.backbone.get("weights", "")  # runs saved before the field: none
  pretrained = model.backbone.pretrained(weights) if weights else None
  variables = jax.jit(lambda r: _random_variables(model, r))(rng)
  if pretrained is not None:
    variables = with_backbone(variables, pretrained, f"model.backbone.weights={weights}")
    log.info("Backbone %s: loaded its %s weights", config.model.backbone.name, weights)
  if init_from is not None:
    variables, report = load_init_from(init_from, model, config, variables)
    log.info("%s", "\n".join(report.lines()))
  return jax.tree.map(jnp.asarray, variables)


def with_backbone(variables: dict, backbone: dict, what: str) -> dict:
  """`variables` with the backbone's {"params", "batch_stats"} replaced by `backbone`'s, which
  must have exactly their paths and shapes (a ValueError lists every difference)."""
  current = {c: variables.get(c, {}).get("backbone", {}) for c in ("params", "batch_stats")}
  want = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(current).items()}
  got = {"/".join(k): v for k, v in traverse_util.flatten_dict(backbone).items()}
  name_table.check(got, want, f"{what}: the file")
  return {**variables, **{c: {**variables.get(c, {}), "backbone": backbone[c]}
                          for c in ("params", "batch_stats") if c in backbone}}


def _init_from_path(init_from: str, workdir: str | pathlib.Path | None) -> pathlib.Path:
  """`model.init_from` as a path, once it is known to name something to start from."""
  path = pathlib.Path(init_from)
  usage = ("model.init_from takes the workdir of an earlier training run or an official Sparse "
           "R-CNN checkpoint file (.pth / .npz)")
  if not path.exists():
    raise FileNotFoundError(f"model.init_from={init_from}: {path.resolve()} does not exist; "
                            f"{usage}.")
  if workdir is not None and path.resolve() == pathlib.Path(workdir).resolve():
    raise ValueError(
        f"model.init_from={init_from} is this run's own workdir. Resuming is automatic: run the "
        "same command without --config.model.init_from and training continues from the newest "
        "checkpoint there. init_from starts a new run (another --workdir) from a run's weights.")
  if path.is_dir() and not checkpointing.has_checkpoint(path):
    raise FileNotFoundError(f"model.init_from={init_from}: {path.resolve() / 'checkpoints'} "
                            f"holds no checkpoint; {usage}.")
  return path


def _architecture(head: HeadConfig, backbone) -> dict:
  """A model's config as the notes of an init_from report compare it: the head's fields and
  the backbone's, as `backbone.depth` and so on."""
  fields = {**dataclasses.asdict(head), **{f"backbone.{k}": v for k, v in backbone.items()}}
  # A config read back from a run's config.json holds lists where the config file has tuples.
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _source_variables(path: pathlib.Path, model: detector.SparseRCNN) -> tuple[dict, str, dict]:
  """(variables, what they are, their model's `_architecture`) of an init_from source: the
  newest checkpoint of a run's workdir, restored with the config and dataset info saved there
  (its moving average of the weights when the run kept one), or an official checkpoint file,
  converted for the head and ResNet its tensors show."""
  if path.is_dir():
    run = load_run(path, mesh=sharding.make_mesh())
    weights = "its moving average of the weights" if run.ema else "its weights"
    return (run.variables, f"{path} (step {run.step}, {weights})",
            _architecture(run.model.head, run.config.model.backbone))
  variables, head, depth = official_variables(path, model.head)
  return (variables, f"{path} (an official checkpoint)",
          _architecture(head, {"name": "resnet", "depth": depth}))


def official_variables(path: str | pathlib.Path, like: HeadConfig) -> tuple[dict, HeadConfig, int]:
  """(variables, head config, ResNet depth) of an official Sparse R-CNN checkpoint file (.pth /
  .npz): the head and depth it was trained with, read from its tensors (the fields no tensor
  shows are `like`'s: official.architecture_of), and its tensors converted for them."""
  state = checkpoint_io.load_state_dict(path)
  head, depth = official.architecture_of(state, like)
  return official.from_official(state, head, depth), head, depth


def load_init_from(path: str | pathlib.Path, model: detector.SparseRCNN,
                   config: ml_collections.ConfigDict,
                   variables: dict) -> tuple[dict, init_from_lib.Report]:
  """`variables` of `model` (built from `config`) with every tensor of the init_from source at
  `path` whose path and shape fit, and the report of what was loaded (init_from.merge)."""
  source, what, architecture = _source_variables(pathlib.Path(path), model)
  merged, report = init_from_lib.merge(source, variables)
  notes = init_from_lib.differences(architecture,
                                    _architecture(model.head, config.model.backbone))
  return merged, dataclasses.replace(report, source=what, notes=notes)


def optimizer(model: detector.SparseRCNN, config: ml_collections.ConfigDict, params):
  """The run's update rule (optim.make_optimizer) for `model`'s `params`."""
  return optim.make_optimizer(config.optimizer, params, batch_size=config.data.batch_size,
                              num_steps=config.train.num_steps, is_frozen=model.is_frozen)


def create_state(model, variables: dict, tx, seed: int, keep_ema: bool = False) -> TrainState:
  """The TrainState of `variables` ({"params"[, "batch_stats"]}) updated by `tx`; with
  `keep_ema` its moving average starts as a copy of the parameters."""
  params = variables["params"]
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=tx,
      batch_stats=variables.get("batch_stats", {}),
      rng=jax.random.key_data(jax.random.PRNGKey(seed + 1)),
      # A copy, not the same buffers: the train step donates the state.
      ema_params=jax.tree.map(jnp.array, params) if keep_ema else {})


def new_state(model: detector.SparseRCNN, config: ml_collections.ConfigDict,
              workdir: str | pathlib.Path | None = None) -> TrainState:
  """A fresh TrainState for training `model` in `workdir` as `config` says (seed, pretrained
  weights, init_from, optimizer)."""
  variables = init_variables(model, config, jax.random.PRNGKey(config.seed), workdir)
  return create_state(model, variables, optimizer(model, config, variables["params"]),
                      config.seed, keep_ema=ema.from_config(config.train) is not None)


def abstract_state(model: detector.SparseRCNN, config: ml_collections.ConfigDict,
                   mesh) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the TrainState `new_state` builds: the
  target to restore a checkpoint into, without allocating a model."""
  def build(rng):
    variables = _random_variables(model, rng)
    return create_state(model, variables, optimizer(model, config, variables["params"]),
                        config.seed, keep_ema=ema.from_config(config.train) is not None)
  shapes = jax.eval_shape(build, jax.random.PRNGKey(0))
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      shapes)


def restore_variables(model: detector.SparseRCNN, config: ml_collections.ConfigDict,
                      workdir: str | pathlib.Path, mesh, step: int | None = None,
                      use_ema: bool = True, target: TrainState | None = None
                      ) -> tuple[dict, int]:
  """({"params", "batch_stats"}, step) of `model` from the checkpoint of `step` (default: the
  newest) in `workdir`: the moving average of the parameters when the run kept one
  (train.ema_decay > 0) and `use_ema`, else the parameters. `target`: abstract_state's, when
  the caller has it already."""
  target = abstract_state(model, config, mesh) if target is None else target
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  try:
    restored = checkpointing.restore(manager, target, step)
  finally:
    manager.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {pathlib.Path(workdir) / 'checkpoints'}")
  state, _ = restored
  return state.eval_variables(use_ema), int(state.step)


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A trained run as eval.py, predict.py, export.py and init_from read it (`load_run`).

  Attributes:
    config: the config to run with (the one given, else the run's own).
    info: the run's classes (its dataset_info.json).
    model: built from `config.model` for those classes.
    variables: {"params", "batch_stats"} of the checkpoint.
    step: the checkpoint's step.
    ema_kept: whether the run kept a moving average of the weights (train.ema_decay > 0).
    ema: whether `variables` are that moving average (ema_kept and asked for).
  """
  config: ml_collections.ConfigDict
  info: info_lib.DatasetInfo
  model: Any
  variables: dict
  step: int
  ema_kept: bool
  ema: bool


def _flat(config: ml_collections.ConfigDict) -> dict:
  """A config's leaves by dotted name, lists and tuples alike (config.json holds lists)."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def _check_fits(target: TrainState, workdir: pathlib.Path, step: int | None,
                given: ml_collections.ConfigDict, run: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the model fields of `given` that differ from the run's
  (`run`) when the parameters of `target` (abstract_state's) do not have the shapes the
  checkpoint holds."""
  stored = checkpointing.stored_shapes(workdir, step)
  params = target.params
  wanted = {"params/" + "/".join(k): v.shape
            for k, v in traverse_util.flatten_dict(params).items()}
  misfits = sorted(k for k in wanted if stored and stored.get(k) != wanted[k])
  if not misfits:
    return
  ours, theirs = _flat(given), _flat(run)
  differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
  fields = "; ".join(f"model.{k}: {theirs.get(k, '(unset)')!r} in the run, "
                     f"{ours.get(k, '(unset)')!r} in --config" for k in differ)
  tensors = ", ".join(f"{k} {stored.get(k, '(absent)')} stored, {wanted[k]} wanted"
                      for k in misfits[:3])
  raise ValueError(
      f"The checkpoint in {workdir} does not fit the model of the given --config "
      f"({fields or 'no model field differs'}; {len(misfits)} tensors differ, e.g. {tensors}). "
      f"Leave out --config to use the run's own ({workdir / 'config.py'}), or override single "
      f"fields of it: --config {workdir / 'config.py'} --config.data.eval_ann=...")


def load_run(workdir: str | pathlib.Path, config: ml_collections.ConfigDict | None = None, *,
             step: int | None = None, use_ema: bool = True, mesh=None,
             build_model=detector.build_model) -> LoadedRun:
  """The checkpoint of `step` (default: the newest) of the training run in `workdir`, with the
  model of `config` (default: the run's saved config) built by `build_model(config.model,
  num_classes)`.

  The checkpoint's layout follows what the run trained with (its optimizer, whether it kept a
  moving average), so those settings are taken from the run's own config whatever `config`
  says; a `config` whose model does not fit the checkpoint is refused with the fields that
  differ.
  """
  workdir = pathlib.Path(workdir)
  saved = run_files.load_config(workdir) if (workdir / run_files.CONFIG_JSON).exists() else None
  if config is None:
    config = saved if saved is not None else run_files.config_for(None, workdir)  # Raises.
  trained = saved if saved is not None else config
  info = info_lib.DatasetInfo.load(workdir)
  model = build_model(config.model, info.num_classes)
  mesh = sharding.make_mesh(jax.devices()[:1]) if mesh is None else mesh
  target = abstract_state(model, trained, mesh)
  if saved is not None and config is not saved:
    _check_fits(target, workdir, step, given=config.model, run=saved.model)
  variables, step = restore_variables(model, trained, workdir, mesh, step, use_ema, target)
  ema_kept = trained.train.get("ema_decay", 0.0) > 0
  return LoadedRun(config, info, model, variables, step, ema_kept, use_ema and ema_kept)
