"""End-to-end runs of `python -m jaxlm.main` on the tiny config: the report, resume
after SIGKILL, eval mode, and one-line errors that leave the workdir untouched."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxlm
from conftest import REPO, fresh_workdir
from jaxlm.data.tokenizer import Tokenizer

TINY = f"--config={REPO / 'configs/default.py'}:tiny"

pytestmark = pytest.mark.slow


def run_main(workdir, *args, config=TINY, env=None):
  cmd = [sys.executable, "-m", "jaxlm.main", config, f"--workdir={workdir}", *args]
  full_env = {**os.environ, **(env or {})}
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=full_env,
                        timeout=600)


def rows(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_corpus):
  wd = fresh_workdir(tmp_path_factory.mktemp("trained"), tiny_corpus)
  r = run_main(wd)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, r


def test_main_job_report_metrics_and_export(trained):
  wd, r = trained
  rep = json.loads((wd / "report.json").read_text())
  for key in ("val_mlm_perplexity", "unigram_perplexity", "val_mlm_accuracy",
              "val_nsp_accuracy", "params", "tokens_seen", "test_mlm_perplexity"):
    assert rep[key] is not None, key
  assert rep["params"] > 10_000 and rep["tokens_seen"] > 20 * 8 * 10
  assert rep["fill_mask"] and len(rep["fill_mask"][0]["top5"]) == 5
  assert "== jaxlm report ==" in r.stdout
  train_rows = [x for x in rows(wd) if "loss" in x]
  assert {"step", "loss", "learning_rate", "tokens_per_s", "step_time_s"} <= set(train_rows[0])
  assert all(0 < x["step_time_s"] < 60 for x in train_rows)
  assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns
  val_rows = [x for x in rows(wd) if "val_loss" in x]
  assert [x["step"] for x in val_rows] == [10, 20]
  assert {"val_mlm_perplexity", "val_mlm_accuracy", "val_nsp_accuracy"} <= set(val_rows[0])
  assert any(f.startswith("events") for f in os.listdir(wd / "tensorboard"))
  # The export reloads through the public API and the tokenizer saved beside it.
  model = jaxlm.from_pretrained(str(wd / "model"))
  tok = Tokenizer.load(str(wd / "model"))
  assert model.config.vocab_size == tok.vocab_size


def test_rerun_resumes_instead_of_starting_over(trained, tmp_path):
  wd = tmp_path / "copy"
  shutil.copytree(trained[0], wd)
  before = rows(wd)
  r = run_main(wd)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming from checkpoint at step 20" in r.stderr
  assert rows(wd) == before  # no step was trained again


def test_eval_mode_reproduces_final_validation(trained, tmp_path):
  wd = tmp_path / "copy"
  shutil.copytree(trained[0], wd)
  r = run_main(wd, "--mode=eval")
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads((wd / "eval.json").read_text())
  rep = json.loads((wd / "report.json").read_text())
  assert out["step"] == 20
  np.testing.assert_allclose(out["val_mlm_perplexity"], rep["val_mlm_perplexity"], rtol=1e-5)
  np.testing.assert_allclose(out["test_nsp_accuracy"], rep["test_nsp_accuracy"], rtol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_corpus):
  a = fresh_workdir(tmp_path_factory.mktemp("uninterrupted"), tiny_corpus)
  ra = run_main(a, *KILL_ARGS)
  assert ra.returncode == 0, ra.stderr[-3000:]
  return a


# Dropout on, so a resumed run must also reproduce the dropout masks.
KILL_ARGS = ["--config.train.steps=30", "--config.checkpoint.every=10",
             "--config.model.hidden_dropout_prob=0.1"]


@pytest.mark.parametrize("where", ["JAXLM_KILL_AT_STEP", "JAXLM_KILL_IN_SAVE_AT_STEP"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_corpus, uninterrupted, where):
  """SIGKILL between steps (15), or inside the step-20 checkpoint write (its temporary
  directory written, not yet finalized); the rerun resumes from step 10, bit for bit."""
  args, a = KILL_ARGS, uninterrupted
  b = fresh_workdir(tmp_path, tiny_corpus, "killed")
  rb = run_main(b, *args, env={where: "15" if where == "JAXLM_KILL_AT_STEP" else "20"})
  assert rb.returncode == -signal.SIGKILL
  assert not (b / "model").exists()
  ckpts = sorted(p.name for p in (b / "checkpoints").iterdir())
  if where == "JAXLM_KILL_IN_SAVE_AT_STEP":  # the half-written step-20 checkpoint is there
    assert "10" in ckpts and "20" not in ckpts and any(n.startswith("20.") for n in ckpts), ckpts
  rb = run_main(b, *args)
  assert rb.returncode == 0, rb.stderr[-3000:]
  assert "resuming from checkpoint at step 10" in rb.stderr
  wa, wb = load_file(str(a / "model/model.safetensors")), load_file(str(b / "model/model.safetensors"))
  assert wa.keys() == wb.keys()
  for k in wa:
    np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
  assert [x["step"] for x in rows(a)] == [x["step"] for x in rows(b)]
  assert [x.get("loss") for x in rows(a)] == [x.get("loss") for x in rows(b)]


def _snapshot(d: Path):
  """Every file's size and mtime, but the lock file, which each run rewrites with its
  holder (train/lock.py)."""
  return sorted((str(p.relative_to(d)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in d.rglob("*") if p.name != ".lock")


def _bad_inputs(tmp: Path):
  empty = tmp / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  (empty / "b.txt").write_text("too short")
  latin = tmp / "latin"
  latin.mkdir()
  (latin / "good.txt").write_text("All the world's a stage. " * 40)
  (latin / "bad.txt").write_bytes("Caf\u00e9 au lait. ".encode("latin-1") * 40)
  return {
      "missing source": ([f"--config.data.source={tmp}/nowhere/*.txt"], "nowhere"),
      "empty corpus": ([f"--config.data.source={empty}"], "empty corpus"),
      "not utf-8": ([f"--config.data.source={latin}"], "bad.txt"),
      "unknown key": (["--config.train.stepz=3"], "stepz"),
      "heads": (["--config.model.hidden_size=33"], "divisible"),
      "seq len": (["--config.data.max_seq_len=128"], "max_position_embeddings"),
  }


def test_bad_input_one_line_error_untouched_workdir(tmp_path, trained):
  cases = _bad_inputs(tmp_path)
  for name, (args, needle) in cases.items():
    for wd in (tmp_path / f"new-{len(name)}", trained[0]):  # a fresh and a used workdir
      before = _snapshot(wd) if wd.exists() else None
      r = run_main(wd, *args)
      err = r.stderr.strip().splitlines()
      assert r.returncode == 2, (name, r.stderr[-2000:])
      assert len(err) == 1 and err[0].startswith("error:"), (name, err)
      # A used workdir may first refuse the changed data settings; both name the problem.
      assert needle in err[0] or (wd == trained[0] and "new --workdir" in err[0]), (name, err)
      assert "Traceback" not in r.stderr
      assert (_snapshot(wd) if wd.exists() else None) == before, name
