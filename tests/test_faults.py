"""Faults a run meets and how it recovers: a second run on a busy workdir, preemption by a
real SIGTERM, a loss that stops being finite, a corrupted newest checkpoint, a full disk,
fuzzed configs and broken Hugging Face directories."""

import ast
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

import jaxlm
from configs import default
from conftest import REPO, fixture, fresh_workdir
from jaxlm import experiment
from jaxlm.errors import JaxlmError
from jaxlm.train import loop

pytestmark = pytest.mark.slow
TINY = f"--config={REPO / 'configs/default.py'}:tiny"


def popen(workdir, *args, env=None):
  return subprocess.Popen([sys.executable, "-m", "jaxlm.main", TINY, f"--workdir={workdir}",
                           *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, **(env or {})})


def run_main(workdir, *args, config=TINY, timeout=600):
  return subprocess.run([sys.executable, "-m", "jaxlm.main", config, f"--workdir={workdir}",
                         *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def rows(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(workdir, step, proc, timeout=300):
  t_end = time.time() + timeout
  while time.time() < t_end:
    if any(r.get("step", 0) >= step for r in rows(workdir)):
      return
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.05)
  raise AssertionError(f"step {step} never logged")


def one_error_line(r):
  """The only line on stderr (a run refused before it started)."""
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  return lines[0]


def final_error_line(r):
  """The error that ended a run that had started (progress lines come before it)."""
  lines = r.stderr.strip().splitlines()
  assert lines and lines[-1].startswith("error:") and "Traceback" not in r.stderr, \
      r.stderr[-2000:]
  return lines[-1]


# ---- the workdir lock ---------------------------------------------------------------------
def test_a_second_run_is_refused_and_a_killed_holder_does_not_block(tmp_path, tiny_corpus):
  wd = fresh_workdir(tmp_path, tiny_corpus)
  args = ["--config.train.steps=400", "--config.train.log_every=5",
          "--config.checkpoint.every=10", "--config.train.eval_every=400"]
  first = popen(wd, *args)
  wait_for_step(wd, 15, first)
  t0 = time.time()
  second = run_main(wd, *args, timeout=60)
  elapsed = time.time() - t0
  assert elapsed < 10, elapsed  # refused at once (process start and imports included)
  assert second.returncode == 2
  line = one_error_line(second)
  assert f"pid {first.pid} on" in line and "in use by another run" in line, line
  os.kill(first.pid, signal.SIGKILL)  # the kernel drops its lock
  first.wait()
  third = run_main(wd, *args)
  assert third.returncode == 0, third.stderr[-2000:]
  assert "resuming from checkpoint at step" in third.stderr
  steps = [r["step"] for r in rows(wd) if "loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 400  # no step logged twice


# ---- preemption ------------------------------------------------------------------------------
def test_sigterm_saves_and_the_rerun_matches_an_uninterrupted_run(tmp_path, tiny_corpus):
  # Dropout on: the resumed run must also reproduce the dropout masks.
  # 200 steps, the signal at step 4-24: a tiny step takes milliseconds, so a run much
  # shorter than that can finish its loop before the signal lands, and then rightly exits 0.
  args = ["--config.train.steps=200", "--config.checkpoint.every=10",
          "--config.model.hidden_dropout_prob=0.1", "--config.train.log_every=1",
          "--config.train.eval_every=100"]
  a = fresh_workdir(tmp_path, tiny_corpus, "uninterrupted")
  log = open(tmp_path / "reference.log", "w")  # a file: a pipe nobody reads could fill up
  reference = subprocess.Popen([sys.executable, "-m", "jaxlm.main", TINY, f"--workdir={a}", *args],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT)  # alongside b
  b = fresh_workdir(tmp_path, tiny_corpus, "preempted")
  at = random.Random(os.getpid()).randint(4, 24)
  proc = popen(b, *args)
  wait_for_step(b, at, proc)
  os.kill(proc.pid, signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  line = err.strip().splitlines()[-1]
  saved = int(line.split("at step ")[1].split(":")[0])
  assert line.startswith("SIGTERM at step") and saved >= at and "checkpoint saved" in line
  assert str(saved) in os.listdir(b / "checkpoints") and not (b / "model").exists()
  r = run_main(b, *args)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"resuming from checkpoint at step {saved}" in r.stderr
  reference.wait(timeout=600)
  log.close()
  assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-2000:]
  wa = load_file(str(a / "model/model.safetensors"))
  wb = load_file(str(b / "model/model.safetensors"))
  for k in wa:
    np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
  assert [x.get("loss") for x in rows(a)] == [x.get("loss") for x in rows(b)]


# ---- non-finite losses ----------------------------------------------------------------------
DIVERGE = ["--config.train.learning_rate=1e4", "--config.train.warmup_steps=20",
           "--config.train.steps=40", "--config.train.log_every=1",
           "--config.checkpoint.every=2", "--config.train.eval_every=40",
           "--config.train.grad_clip_norm=0.0"]


def test_a_diverging_run_stops_at_the_bad_step_and_eval_uses_the_last_good_checkpoint(
    tmp_path, tiny_corpus):
  wd = fresh_workdir(tmp_path, tiny_corpus)
  r = run_main(wd, *DIVERGE)
  assert r.returncode == 3, r.stderr[-2000:]
  line = final_error_line(r)
  bad = int(line.split("error: step ")[1].split(":")[0])
  assert "not finite" in line and "train.nan_policy=stop" in line
  logged = [x for x in rows(wd) if "loss" in x]
  assert all(np.isfinite(x["loss"]) for x in logged if x["step"] < bad)
  assert max(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()) < bad
  ev = run_main(wd, *DIVERGE, "--mode=eval")
  assert ev.returncode == 0, ev.stderr[-2000:]
  out = json.loads((wd / "eval.json").read_text())
  assert np.isfinite(out["val_loss"]) and out["step"] < bad


def test_skip_policy_counts_skipped_steps(tmp_path, tiny_corpus):
  wd = fresh_workdir(tmp_path, tiny_corpus)
  r = run_main(wd, *DIVERGE, "--config.train.nan_policy=skip",
               "--config.train.max_skipped_steps=3")
  assert r.returncode == 3, r.stderr[-2000:]
  assert "3 non-finite steps in a row" in final_error_line(r)
  skipped = [x["skipped_steps"] for x in rows(wd) if "skipped_steps" in x]
  assert skipped[0] == 0 and skipped[-1] >= 3


# ---- checkpoint fallback --------------------------------------------------------------------
TWENTY = ["--config.train.steps=20", "--config.checkpoint.every=10",
          "--config.checkpoint.max_to_keep=3"]


@pytest.fixture(scope="module")
def twenty_steps(tmp_path_factory, tiny_corpus):
  """A finished 20-step run with checkpoints at 10 and 20 (each test works on a copy)."""
  wd = fresh_workdir(tmp_path_factory.mktemp("twenty"), tiny_corpus)
  r = run_main(wd, *TWENTY)
  assert r.returncode == 0, r.stderr[-2000:]
  return wd


def test_a_garbled_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, twenty_steps):
  wd = tmp_path / "run"
  shutil.copytree(twenty_steps, wd)
  newest = wd / "checkpoints" / "20"
  biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(os.urandom(biggest.stat().st_size))
  shutil.rmtree(wd / "model")
  r = run_main(wd, "--config.train.steps=30", "--config.checkpoint.every=10",
               "--config.checkpoint.max_to_keep=3")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "checkpoint at step 20 cannot be restored" in r.stderr
  assert "resuming from checkpoint at step 10" in r.stderr
  assert json.loads((wd / "report.json").read_text())["steps"] == 30


def test_no_restorable_checkpoint_is_an_error_and_fresh_moves_them_aside(tmp_path, twenty_steps):
  wd = tmp_path / "run"
  shutil.copytree(twenty_steps, wd)
  for p in (wd / "checkpoints").rglob("*"):
    if p.is_file() and p.stat().st_size > 100:
      p.write_bytes(b"\0" * 64)
  r = run_main(wd, *TWENTY)
  assert r.returncode == 2 and "no checkpoint in" in final_error_line(r)
  assert "checkpoint at step 20 cannot be restored" in r.stderr
  assert "checkpoint at step 10 cannot be restored" in r.stderr
  r = run_main(wd, *TWENTY, "--fresh")
  assert r.returncode == 0, r.stderr[-2000:]
  assert [p for p in os.listdir(wd) if p.startswith("checkpoints.stale-")]


# ---- write errors ---------------------------------------------------------------------------
def test_disk_full_during_a_save_is_one_line_and_the_previous_checkpoint_restores(
    tmp_path, tiny_corpus, monkeypatch):
  from configs import default
  cfg = default.get_config("tiny")
  cfg.train.update(steps=20, eval_every=20)
  cfg.checkpoint.every = 10
  wd = fresh_workdir(tmp_path, tiny_corpus)
  real_save = ocp.CheckpointManager.save

  def full_disk(self, step, *a, **kw):
    if step == 20:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(self, step, *a, **kw)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(JaxlmError) as e:
    loop.train(cfg, str(wd))
  msg = str(e.value)
  assert "\n" not in msg and "No space left on device" in msg and "step-20" in msg
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  rep = loop.train(cfg, str(wd))  # the step-10 checkpoint restores; the run finishes
  assert rep["steps"] == 20


# ---- bad input: fuzzed configs ----------------------------------------------------------------
def _bad_values(key, default):
  """Values that must be refused for `key` (type mismatches, out-of-range numbers and
  unknown choices)."""
  out = []
  if isinstance(default, bool):
    out += ["yes", 1]
  elif isinstance(default, int):
    out += ["ten", 2.5, True]
  elif isinstance(default, float):
    out += ["0.1", None, False]
  elif isinstance(default, str):
    out += [3, ["a"]]
  if key in experiment._BOUNDS:
    lo, hi, lo_open, hi_open = experiment._BOUNDS[key]
    if lo is not None:
      out.append(lo if lo_open else lo - 1)
    if hi is not None:
      out.append(hi if hi_open else hi + 1)
  if key in experiment._CHOICES:
    out.append("no-such-choice")
  return out


def test_fuzzed_configs_are_one_line_errors_before_anything_is_written(tmp_path):
  base = experiment.base_config().to_dict()
  flat = {}

  def walk(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        flat[f"{prefix}{k}"] = v
  walk(base)
  named = [("train.steps", 0), ("train.steps", -5), ("train.batch_size", 0),
           ("train.learning_rate", 0.0), ("train.learning_rate", -1e-3),
           ("model.num_attention_heads", 0), ("model.num_attention_heads", -2),
           ("data.split", (0.9, 0.05, 0.1)), ("data.split", (1.0, 0.0, 0.0)),
           ("tokenizer.vocab_size", 3), ("model.hidden_dropout_prob", 1.0),
           ("model.attention_probs_dropout_prob", 1.5), ("train.precision", "fp8"),
           ("mesh.data", 3), ("checkpoint.every", 0), ("train.nan_policy", "ignore")]
  cases = list(named)
  rng = random.Random(0)
  for key, default in flat.items():
    if key in ("model.init_from", "data.source", "tokenizer.path", "mesh.rules",
               "model.architectures", "model.model_type", "data.text_key", "data.tfds_split"):
      continue  # free-form strings (or validated against the filesystem elsewhere)
    for value in _bad_values(key, default):
      cases.append((key, value))
  rng.shuffle(cases)
  assert len(cases) >= 100, len(cases)
  wd = tmp_path / "never-written"
  for key, value in cases:
    d = json.loads(json.dumps(base))
    section = d
    *path, leaf = key.split(".")
    for p in path:
      section = section[p]
    section[leaf] = value
    cfg = ml_collections.ConfigDict(d)
    with pytest.raises(JaxlmError) as e:
      loop.train(cfg, str(wd))
    msg = str(e.value)
    assert "\n" not in msg, (key, value, msg)
    assert not wd.exists(), (key, value)
  print(f"{len(cases)} fuzzed configs refused")


NAMED = [
    ("--config.train.steps=0", "train.steps must be positive"),
    ("--config.train.learning_rate=-1.0", "train.learning_rate must be in (0"),
    ("--config.data.split=(0.5,0.2,0.2)", "data.split must be three positive fractions"),
    ("--config.tokenizer.vocab_size=3", "tokenizer.vocab_size must be in"),
    ("--config.model.hidden_dropout_prob=1.0", "hidden_dropout_prob must be in [0, 1)"),
    ("--config.train.precision=fp8", "train.precision must be"),
    ("--config.mesh.data=3", "mesh"),
    ("--config.checkpoint.every=0", "checkpoint.every"),
    ("--config.model.num_attention_heads=0", "num_attention_heads"),
]


@pytest.mark.parametrize("override,needle", NAMED)
def test_named_bad_configs_are_one_line_errors(tmp_path, override, needle):
  """Each through the same override parser the CLI uses (in process: the CLI path itself,
  exit status 2 and stderr, is checked below on two of them)."""
  key, value = override[len("--config."):].split("=", 1)
  cfg = default.get_config("tiny")
  *path, leaf = key.split(".")
  section = cfg
  for p in path:
    section = section[p]
  old = section[leaf]
  section[leaf] = type(old)(ast.literal_eval(value)) if not isinstance(old, str) else value
  wd = tmp_path / "wd"
  with pytest.raises(JaxlmError) as e:
    loop.train(cfg, str(wd))
  assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not wd.exists()


@pytest.mark.parametrize("override,needle", [NAMED[0], NAMED[6]])
def test_bad_configs_exit_2_from_the_cli(tmp_path, override, needle):
  wd = tmp_path / "wd"
  r = run_main(wd, override, timeout=120)
  assert r.returncode == 2
  line = one_error_line(r)
  assert line.startswith("error:") and needle in line, line
  assert not wd.exists()


# ---- broken Hugging Face directories -----------------------------------------------------------
def _broken(tmp_path, kind):
  d = tmp_path / kind
  shutil.copytree(fixture("llama"), d)
  st = d / "model.safetensors"
  if kind == "truncated":
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
  elif kind == "shape":
    t = load_file(str(st))
    name = "model.layers.0.self_attn.q_proj.weight"
    t[name] = np.zeros((t[name].shape[0] + 1, t[name].shape[1]), np.float32)
    save_file(t, str(st))
  elif kind == "dtype":
    raw = bytearray(st.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].decode().replace('"F32"', '"X99"', 1)
    st.write_bytes(raw[:8] + header.encode() + raw[8 + n:])
  elif kind == "not_json":
    (d / "config.json").write_text("{ this is not json")
  elif kind == "wrong_type":
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = "four"
    (d / "config.json").write_text(json.dumps(cfg))
  elif kind == "missing_shard":
    shutil.rmtree(d)
    shutil.copytree(fixture("llama_sharded"), d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    os.remove(d / sorted(set(index["weight_map"].values()))[-1])
  elif kind == "tokenizer":
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
  return d


HF_CASES = {"truncated": "not a readable safetensors file",
            "shape": "q_proj.weight' has shape", "dtype": "not a readable safetensors file",
            "not_json": "not valid JSON", "wrong_type": "config.json: a field has the wrong",
            "missing_shard": "is missing", "tokenizer": "tokenizer.json"}


@pytest.mark.parametrize("kind", sorted(HF_CASES))
def test_broken_hugging_face_directories(tmp_path, kind):
  d = _broken(tmp_path, kind)
  with pytest.raises(JaxlmError) as e:
    if kind == "tokenizer":
      jaxlm.load_tokenizer(str(d))
    else:
      jaxlm.from_pretrained(str(d))
  assert "\n" not in str(e.value) and HF_CASES[kind] in str(e.value), str(e.value)
  gen = f"--config={REPO / 'configs/generate.py'}"
  r = subprocess.run([sys.executable, "-m", "jaxlm.main", gen, "--mode=generate",
                      f"--config.model.init_from={d}", "--prompt=hello"], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  line = one_error_line(r)
  assert line.startswith("error:"), line
