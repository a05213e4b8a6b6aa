"""Distillation (issue 15): the validation loss of a distilled student against the same
student trained from scratch for the same steps, and against its teacher.

  python benchmarks/compress_distill.py            # the runs below (reused when done)
  python benchmarks/compress_distill.py --quick    # tiny teacher and students, ~4 min

Teacher: runs/compress_teacher (configs/gpt2_small.py:mini: 4 layers, d 128, 2,000 steps).
Runs, each configs/distill_gpt2.py (2 layers, d 128, 2,000 steps, same data, schedule and
tokenizer): `distilled` (runs/compress_student: from teacher layers 0 and 2, 0.5 NLL +
0.5 T^2 KL at T = 2) and `scratch` (:scratch: random init, plain next-token loss); to
separate what the KL does from what the teacher's layers do, `distilled_random_init`
(the KL from a random init) and `teacher_layers_only` (teacher layers 0 and 2, the
next-token loss alone: alpha_kl 1e-6). A run whose workdir holds report.json is read,
not rerun. All exports are then evaluated here, on the same batches: next-token NLL on the
whole validation and test splits, and KL(teacher || student) at T = 1. Prints JSON
(stdout); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from behaviour import _cpu

CONFIG = os.path.join(ROOT, "configs", "distill_gpt2.py")
# name -> (config variant, overrides); {teacher} is the teacher's workdir.
RUNS = {
    "distilled": ("", ["--config.distill.teacher={teacher}"]),
    "scratch": (":scratch", ["--config.tokenizer.path={teacher}/model"]),
    "distilled_random_init": ("", ["--config.distill.teacher={teacher}",
                                   "--config.distill.init_from_teacher_layers=False"]),
    "teacher_layers_only": ("", ["--config.distill.teacher={teacher}",
                                 "--config.distill.alpha_kl=1e-6",
                                 "--config.distill.alpha_hard=1.0"]),
}
FULL_WORKDIRS = {"distilled": "compress_student", "scratch": "compress_student_scratch",
                 "distilled_random_init": "compress_student_noinit",
                 "teacher_layers_only": "compress_student_initonly"}
QUICK_STEPS = 60


from common import write_json  # noqa: E402 (benchmarks/common.py)


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def cli(args: list[str], workdir: str) -> float | None:
  """Runs `python -m jaxlm.main ARGS --workdir=WORKDIR` unless it already finished;
  returns its wall seconds (None when reused)."""
  if os.path.exists(os.path.join(workdir, "report.json")):
    log(f"reusing {workdir}")
    return None
  log(f"training {workdir}: {' '.join(args)}")
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "jaxlm.main", *args, f"--workdir={workdir}"],
                        cwd=ROOT, capture_output=True, text=True, check=False,
                        env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS",
                                                                           "cpu")})
  if proc.returncode:
    raise SystemExit(f"{workdir}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
  return time.time() - t0


def evaluate(model_dirs: dict[str, str], teacher_dir: str, data_dir: str, data_cfg,
             dtype: str) -> dict[str, dict]:
  """Per model: mean next-token NLL on the validation and test splits (all of each) and
  mean KL(teacher || model) at T = 1 on validation, on identical batches."""
  import jax
  from flax import nnx

  from jaxlm import from_pretrained, tasks
  from jaxlm.data.corpus import load_corpus
  from jaxlm.tasks import distill

  corpus = load_corpus(data_dir)
  teacher = from_pretrained(teacher_dir, dtype=dtype)
  causal = tasks.get("causal")
  kd = distill.Distill("causal", temperature=1.0)
  out = {}
  for name, directory in model_dirs.items():
    model = from_pretrained(directory, dtype=dtype)
    pair = distill.Distiller(model, teacher)
    graphdef, state = nnx.split(pair)
    stats_fn = jax.jit(lambda st, b, g=graphdef: kd.stats(nnx.merge(g, st), b))
    row = {"params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
           "layers": model.config.num_hidden_layers}
    for split in ("validation", "test"):
      sums = {}
      for batch in causal.eval_batches(corpus, split, data_cfg, batch_size=64, seed=1):
        for k, v in jax.device_get(stats_fn(state, batch)).items():
          sums[k] = sums.get(k, 0.0) + float(v)
      prefix = "val" if split == "validation" else "test"
      row[f"{prefix}_loss"] = round(sums["lm_loss_sum"] / sums["lm_count"], 4)
      if split == "validation":
        row["val_kl_to_teacher"] = round(sums["kd_kl_sum"] / sums["lm_count"], 4)
        row["val_tokens"] = int(sums["lm_count"])
    out[name] = row
    log(f"{name}: {row}")
  return out


def run(quick: bool = False, teacher: str | None = None, root: str | None = None) -> dict:
  """Trains (or reuses) the runs and evaluates them; returns the JSON document."""
  from configs import distill_gpt2

  tmp = None
  if quick:  # a tiny teacher of its own, and students for QUICK_STEPS steps
    tmp = tempfile.mkdtemp(prefix="compress_distill_")
    root = tmp
    teacher = os.path.join(tmp, "teacher")
    seconds = {"teacher": cli([f"--config={ROOT}/configs/gpt2_small.py:tiny"], teacher)}
    variant, extra = ":tiny", [f"--config.train.steps={QUICK_STEPS}",
                               f"--config.train.eval_every={QUICK_STEPS}",
                               "--config.eval.samples=0"]
    workdirs = {name: os.path.join(root, name) for name in RUNS}
  else:
    teacher = teacher or os.path.join(ROOT, "runs", "compress_teacher")
    root = root or os.path.join(ROOT, "runs")
    seconds, variant, extra = {}, "", []
    workdirs = {name: os.path.join(root, d) for name, d in FULL_WORKDIRS.items()}
  for name, (v, overrides) in RUNS.items():
    args = [f"--config={CONFIG}{variant or v}",
            *(o.format(teacher=teacher) for o in overrides), *extra]
    if quick and v == ":scratch":  # what :scratch changes, on the :tiny student
      args.append("--config.train.objective=causal")
    seconds[name] = cli(args, workdirs[name])
  cfg = distill_gpt2.get_config("tiny" if quick else None)
  reports = {}
  for name, wd in workdirs.items():
    with open(os.path.join(wd, "report.json"), encoding="utf-8") as f:
      rep = json.load(f)
    reports[name] = {"steps": rep["steps"], "train_seconds": rep["train_seconds"],
                     "report_val_loss": round(rep["val_loss"], 4)}
  models = {"teacher": os.path.join(teacher, "model"),
            **{name: os.path.join(wd, "model") for name, wd in workdirs.items()}}
  teacher_dir = models["teacher"]
  evals = evaluate(models, teacher_dir, os.path.join(workdirs["distilled"], "data"), cfg.data,
                   cfg.model.dtype)
  for name, rep in reports.items():
    evals[name].update(rep)
  d, s = evals["distilled"], evals["scratch"]
  doc = {
      "benchmark": "compress_distill", "quick": quick, "cpu": _cpu(),
      "date": time.strftime("%Y-%m-%d %H:%M:%S"),
      "teacher_workdir": os.path.relpath(teacher, ROOT) if not quick else "(temporary)",
      "recipe": {k: cfg.distill[k] for k in ("temperature", "alpha_kl", "alpha_hard",
                                             "alpha_cos", "init_from_teacher_layers")},
      "models": evals,
      "distilled_minus_scratch_val_loss": round(d["val_loss"] - s["val_loss"], 4),
      "distilled_beats_scratch": d["val_loss"] < s["val_loss"],
      # Wall seconds of the runs this call trained (null: an existing run was read).
      "cli_seconds": {k: None if v is None else round(v, 1) for k, v in seconds.items()},
  }
  if tmp is not None:
    shutil.rmtree(tmp, ignore_errors=True)
  else:
    doc["commands"] = {name: f"python -m jaxlm.main --config=configs/distill_gpt2.py{v} "
                             + " ".join(o.format(teacher="runs/compress_teacher")
                                        for o in overrides)
                             + f" --workdir=runs/{FULL_WORKDIRS[name]}"
                       for name, (v, overrides) in RUNS.items()}
  return doc


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--teacher", default=None, help="the teacher's workdir (full run)")
  ap.add_argument("--workdirs", default=None, help="where the student runs live (full run)")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  text = json.dumps(run(a.quick, a.teacher, a.workdirs), indent=1)
  print(text)
  write_json(text, a.out)


if __name__ == "__main__":
  main()
