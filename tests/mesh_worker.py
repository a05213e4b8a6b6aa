"""Runs tiny trainings on a mesh of fake CPU devices for tests/test_parallel.py.

The device count is fixed when JAX starts, so the tests run this script in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=N:

  python tests/mesh_worker.py SPEC.json OUT.json

SPEC: {"data": prepared corpus dir, "runs": [{"name", "config": "configs/x.py:variant",
"overrides": {"mesh.fsdp": 8, ...}, "workdir", "keep_workdir": bool,
"check_sharding": bool}]}. OUT: {name: {"losses": [...], "val_loss", "sharding": ...}};
final weights stay in each workdir's model/model.safetensors.
"""

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxlm.parallel.mesh import make_mesh  # noqa: E402
from jaxlm.train import loop  # noqa: E402


def load_config(spec: str):
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def apply(cfg, overrides: dict):
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


def sharding_report(cfg, workdir: str) -> dict:
  """For every parameter and Adam moment with >= 4096 elements: the fraction of it each
  device holds (1/8 under fsdp=8)."""
  mesh = make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    _, model, _ = loop.setup(cfg, workdir, mesh)
    _, params, _, _, _, opt_state, _ = loop.sharded_train_state(model, cfg, mesh)
  out = {}
  for kind, tree in (("param", params), ("moment", opt_state)):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if x.size < 4096:
        continue
      fractions = {math.prod(s.data.shape) / x.size for s in x.addressable_shards}
      out[f"{kind}:{jax.tree_util.keystr(path)}"] = sorted(fractions)
  return out


def main(spec_path: str, out_path: str) -> None:
  spec = json.load(open(spec_path))
  results = {}
  for run in spec["runs"]:
    cfg = apply(load_config(run["config"]), run.get("overrides", {}))
    wd = run["workdir"]
    if not run.get("keep_workdir"):
      shutil.rmtree(wd, ignore_errors=True)
      shutil.copytree(spec["data"], os.path.join(wd, "data"))
    for name in run.get("remove", []):  # e.g. a checkpoint, to resume from an earlier one
      shutil.rmtree(os.path.join(wd, name))
    res = {}
    if run.get("check_sharding"):
      res["sharding"] = sharding_report(cfg, wd)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
      rep = loop.train(cfg, wd)
    sys.stderr.write(log.getvalue())
    resumed = re.findall(r"resuming from checkpoint at step (\d+)", log.getvalue())
    res["resumed_from"] = int(resumed[0]) if resumed else None
    rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    res["losses"] = [r["loss"] for r in rows if "loss" in r]
    res["val_loss"] = rep["val_loss"]
    res["devices"] = jax.device_count()
    results[run["name"]] = res
    print(f"{run['name']}: {res['losses']}", file=sys.stderr, flush=True)
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
