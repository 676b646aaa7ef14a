"""What a training run writes beside its checkpoints so that every later program can start
from the workdir alone: the config as run, and the dataset info.

  WORKDIR/config.json         the resolved config (with every command-line override)
  WORKDIR/config.py           the same as a config file, to override fields again:
                              --config WORKDIR/config.py --config.data.eval_ann=...
  WORKDIR/dataset_info.json   class names and category ids (data/info.py)
"""
import json
import pathlib

import ml_collections

from sparse_rcnn_jax.data import info as info_lib

CONFIG_JSON = "config.json"
_CONFIG_PY = '''"""The config of the training run in this folder (written by train.py)."""
import json
import pathlib

import ml_collections


def get_config():
  path = pathlib.Path(__file__).with_name("config.json")
  return ml_collections.ConfigDict(json.loads(path.read_text()))
'''


def save(workdir: str | pathlib.Path, config: ml_collections.ConfigDict,
         info: info_lib.DatasetInfo) -> None:
  """Writes the run's config and dataset info to `workdir` (created if needed)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / CONFIG_JSON).write_text(config.to_json_best_effort(indent=1))
  (workdir / "config.py").write_text(_CONFIG_PY)
  info.save(workdir)


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = pathlib.Path(workdir) / CONFIG_JSON
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: train.py writes it at the start of a run; "
                            "pass --config for a workdir made otherwise.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def config_for(config: ml_collections.ConfigDict | None, workdir: str | pathlib.Path | None
               ) -> ml_collections.ConfigDict:
  """The --config given on the command line, else the workdir's."""
  if config is not None:
    return config
  if not workdir:
    raise ValueError("Give --config, or --workdir of a training run.")
  return load_config(workdir)
