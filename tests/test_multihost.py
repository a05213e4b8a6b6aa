"""Multi-host training through `python -m jaxlm.main`: two processes on localhost (4 CPU
devices each, one JAX job over gloo) train, checkpoint, resume and export exactly what one
process with 8 devices does, and only the primary process writes the shared files."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import portpicker
import pytest
from safetensors.numpy import load_file

from jaxlm.errors import ConfigError
from jaxlm.parallel import distributed

from conftest import REPO, fresh_workdir

STEPS = 5
# fsdp=8 shards every parameter and optimizer moment across both processes' devices.
ARGS = [f"--config={REPO / 'configs/llama_1b.py'}:tiny", f"--config.train.steps={STEPS}",
        "--config.train.log_every=1", f"--config.train.eval_every={STEPS}",
        f"--config.checkpoint.every={STEPS}", "--config.eval.samples=0",
        "--config.eval.max_batches=1", "--config.eval.batch_size=16",
        "--config.mesh.data=1", "--config.mesh.fsdp=8"]
TIMEOUT_S = 240  # per job; a hung collective must fail the test, never stall CI


def _env(devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()}


def run_job(workdir: Path, *, processes: int, extra=()) -> list[tuple[int, str, str]]:
  """Runs one training job as `processes` local processes (8 CPU devices in all);
  [(exit status, stdout, stderr)] by process id. When one process fails, or the job
  outlives TIMEOUT_S, the others are killed at once (they would wait for it)."""
  cmd = [sys.executable, "-m", "jaxlm.main", *ARGS, f"--workdir={workdir}", *extra]
  if processes > 1:
    cmd += [f"--coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}",
            f"--num_processes={processes}"]
  logs, procs = [], []
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for i in range(processes):
      logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
      procs.append(subprocess.Popen(
          cmd + ([f"--process_id={i}"] if processes > 1 else []), cwd=REPO,
          env=_env(8 // processes), stdout=logs[-1][0], stderr=logs[-1][1], text=True))
    while (any(p.poll() is None for p in procs) and time.monotonic() < deadline
           and not any(p.poll() for p in procs)):
      time.sleep(0.1)
    timed_out = any(p.poll() is None for p in procs) and not any(p.poll() for p in procs)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    result = []
    for p, files in zip(procs, logs):
      for f in files:
        f.seek(0)
      result.append((p.returncode, files[0].read(), files[1].read()))
      for f in files:
        f.close()
  if timed_out:
    pytest.fail(f"job timed out after {TIMEOUT_S}s: " + " | ".join(e[-1000:] for *_, e in result))
  return result


@pytest.fixture(scope="module")
def corpus(tiny_corpus):
  return tiny_corpus


def workdir_with(corpus: Path, parent: Path, name: str) -> Path:
  return fresh_workdir(parent, corpus, name)


def rows(workdir: Path) -> list[dict]:
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def weights(workdir: Path) -> dict[str, np.ndarray]:
  return load_file(str(workdir / "model/model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_two_processes_train_like_one(corpus, tmp_path):
  one = workdir_with(corpus, tmp_path, "one")
  two = workdir_with(corpus, tmp_path, "two")
  [single] = run_job(one, processes=1)
  assert single[0] == 0, single[2][-3000:]
  procs = run_job(two, processes=2)
  for i, (code, _, err) in enumerate(procs):
    assert code == 0, f"process {i}: {err[-3000:]}"

  # Same global batches, same sharded step: the same losses and the same weights.
  a, b = rows(one), rows(two)
  assert [r["step"] for r in a] == [r["step"] for r in b]
  train_a, train_b = [r for r in a if "loss" in r], [r for r in b if "loss" in r]
  assert [r["step"] for r in train_b] == list(range(1, STEPS + 1))  # each step once
  assert [r["step"] for r in b if "val_loss" in r] == [STEPS]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in train_b], [r[key] for r in train_a],
                               rtol=1e-5, err_msg=key)
  assert train_b[-1]["loss"] < train_b[0]["loss"] - 0.05  # it learned something
  assert_same_weights(weights(two), weights(one))
  rep_a = json.loads((one / "report.json").read_text())
  rep_b = json.loads((two / "report.json").read_text())
  assert rep_b["tokens_seen"] == rep_a["tokens_seen"] > 0  # every process's rows counted
  for key in ("val_loss", "test_loss", "val_perplexity"):
    np.testing.assert_allclose(rep_b[key], rep_a[key], rtol=1e-5, err_msg=key)

  # Only the primary writes shared files and reports; the other process stays quiet.
  (_, out0, err0), (_, out1, err1) = procs
  assert out0.count("== jaxlm report ==") == 1 and "== jaxlm report ==" not in out1
  progress = re.compile(r"^step \d+/\d+ loss", re.M)
  assert len(progress.findall(err0)) == STEPS and not progress.search(err1)
  assert len(list((two / "tensorboard").iterdir())) == 1
  assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

  # Rerun: both processes restore the sharded checkpoint, train nothing again and export
  # the very same weights.
  before = (two / "metrics.jsonl").read_text()
  exported = weights(two)
  procs = run_job(two, processes=2)
  for i, (code, _, err) in enumerate(procs):
    assert code == 0, f"process {i}: {err[-3000:]}"
  assert f"resuming from checkpoint at step {STEPS}" in procs[0][2]
  assert (two / "metrics.jsonl").read_text() == before
  for k, v in weights(two).items():
    np.testing.assert_array_equal(v, exported[k], err_msg=k)


def main_error(*args: str) -> str:
  r = subprocess.run([sys.executable, "-m", "jaxlm.main", *ARGS[:1], "--workdir=/nonexistent",
                      *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                     env=_env(1))
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
  return lines[0]


def test_bad_multihost_flags_one_line_errors():
  assert "give all three or none" in main_error("--num_processes=2")
  assert "HOST:PORT" in main_error("--coordinator_address=localhost", "--num_processes=2",
                                   "--process_id=0")
  assert "--process_id 2 is outside 0..1" in main_error(
      "--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2")


def test_cluster_detection_follows_jax(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR")):
      monkeypatch.delenv(k)
  monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
  assert distributed.detect_cluster() is None
  # sbatch's batch script, outside `srun`: no job step, so JAX detects no cluster.
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.detect_cluster() is None
  # Inside `srun`: a 4-process job (one task: a single host, which initialize skips).
  for k, v in (("SLURM_STEP_NODELIST", "node[1-4]"), ("SLURM_PROCID", "2"),
               ("SLURM_LOCALID", "0")):
    monkeypatch.setenv(k, v)
  assert distributed.detect_cluster() == ("slurm", 4)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.detect_cluster() == ("slurm", 1)
  assert distributed.initialize() is False


class _Device(NamedTuple):
  id: int
  process_index: int


class _Sharding:
  """Stands in for a batch NamedSharding: device -> rows, 2 processes x 4 devices."""

  def __init__(self, rows_of_device):
    self.rows = rows_of_device

  def devices_indices_map(self, shape):
    return {_Device(d, d // 4): (slice(*self.rows(d, shape[0])),) for d in range(8)}


@pytest.mark.parametrize("process", [0, 1])
def test_batch_split_blocks_replicas_and_interleaving(monkeypatch, process):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: process)
  split = distributed.batch_split
  # fsdp=8: each process holds half the batch, in order.
  contiguous = _Sharding(lambda d, b: (d * b // 8, (d + 1) * b // 8))
  assert split(contiguous, 16) == (process, 2, True)
  assert distributed.local_rows(contiguous, 16) == (8 * process, 8)
  # tensor=8 (no batch axis across hosts): both read the whole batch, one counts it.
  replicated = _Sharding(lambda d, b: (None, None))
  assert split(replicated, 16) == (0, 1, process == 0)
  # Devices of the two processes interleaved along the batch: still one block each.
  interleaved = _Sharding(lambda d, b: ((d % 4 * 2 + d // 4) * b // 8,
                                        (d % 4 * 2 + d // 4 + 1) * b // 8))
  assert split(interleaved, 16) == (process, 2, True)
  # Overlapping blocks (process 1 also holds process 0's rows) cannot be fed.
  uneven = _Sharding(lambda d, b: (0, b // 2) if d < 6 else (b // 2, b))
  with pytest.raises(ConfigError, match="mesh: the processes' devices"):
    split(uneven, 16)
