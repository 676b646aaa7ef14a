"""Data flows one way: config -> data -> DatasetInfo -> model -> train / evaluate, and nothing
writes into the config once it is parsed.

Two checks: (1) here, statically: no module of the package or entry point assigns to an
attribute or item of a config (an ml_collections ConfigDict, by the names the code gives
configs: config, data, model, loss, train, optimizer, backbone) or calls .update / setattr on
one; configs/*.py build configs and are exempt, as is absl's override parsing (not our code).
(2) at run time (test_compile_count.py): a main-job run trains, evaluates and draws with a
FrozenConfigDict, which raises on any write.
"""
import ast
import pathlib



ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = {"config", "data", "model", "loss", "train", "optimizer", "backbone"}


def _root_name(node):
  while isinstance(node, (ast.Attribute, ast.Subscript)):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


def _config_writes(path: pathlib.Path) -> list[str]:
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Assign):
      targets = node.targets
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
      targets = [node.target]
    for target in targets:
      if (isinstance(target, (ast.Attribute, ast.Subscript))
          and _root_name(target) in CONFIG_NAMES):
        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(target)}")
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("update", "__setattr__", "__setitem__")
        and _root_name(node.func.value) in CONFIG_NAMES):
      found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
  return found


def test_no_module_writes_into_a_config():
  files = sorted((ROOT / "sparse_rcnn_jax").rglob("*.py")) + [
      ROOT / name for name in ("train.py", "eval.py", "predict.py", "export.py")]
  writes = [w for path in files for w in _config_writes(path)]
  assert not writes, writes
  # The check finds writes where there are some: the config files build configs by writing.
  assert _config_writes(ROOT / "configs" / "synthetic.py")
