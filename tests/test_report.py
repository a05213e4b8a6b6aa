"""jaxlm.report / jaxlm.analysis: parameter counts, FLOPs and the CLI."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import FIXTURES, REPO
from jaxlm import analysis, experiment
from jaxlm.models import auto
from jaxlm.report import _hf_model_config

ROOT = str(REPO)


def model_config(path, variant=None, **model):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(variant)
  cfg.model.update(model)
  return experiment.model_config(cfg)


def counted(mc):
  return analysis.abstract_params(analysis.param_table(auto.build_abstract_model(mc)), mc)


def test_bert_tiny_params():
  D, L, F, V, P, TV = 128, 2, 512, 30522, 512, 2
  embedding = V * D + P * D + TV * D  # word + position + token type
  layer = 4 * (D * D + D) + (D * F + F) + (F * D + D) + 2 * 2 * D  # attn, mlp, 2 LN
  heads = (D * D + D) + (D * D + D + 2 * D + V) + (D * 2 + 2)  # pooler, MLM (tied), NSP
  total = embedding + 2 * D + L * layer + heads
  assert total == 4_433_468
  mc = model_config("configs/bert_tiny.py")
  for got in (counted(mc), analysis.closed_form_params(mc)):
    assert got["total"] == total and got["embedding"] == embedding
    assert got["non_embedding"] == total - embedding


def test_llama_1b_params():
  # Llama 3.2 1B with its 128256-token vocabulary: the published 1.24B.
  D, L, H, KV, hd, F, V = 2048, 16, 32, 8, 64, 8192, 128256
  layer = D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F + 2 * D
  total = V * D + L * layer + D  # tied head, final RMSNorm
  assert total == 1_235_814_400
  mc = model_config("configs/llama_1b.py", vocab_size=V)
  for got in (counted(mc), analysis.closed_form_params(mc)):
    assert got["total"] == total and got["embedding"] == V * D and got["lm_head"] == 0


def test_falcon_7b_params():
  # Falcon-7B with its 65024-token vocabulary: the published 6.92B. Multi-query attention
  # (one KV head), one LayerNorm (with bias) per block, no linear biases, tied head.
  D, L, H, hd, F, V = 4544, 32, 71, 64, 4 * 4544, 65024
  layer = D * H * hd + 2 * D * hd + H * hd * D + 2 * D * F + 2 * D
  total = V * D + L * layer + 2 * D  # + the final LayerNorm
  assert total == 6_921_720_704
  mc = model_config("configs/falcon_7b.py", vocab_size=V)
  for got in (counted(mc), analysis.closed_form_params(mc)):
    assert got["total"] == total and got["embedding"] == V * D and got["lm_head"] == 0


def test_command_r_params():
  # Command-R v01 with its 256000-token vocabulary: 34.98B ("35B"). 64 KV heads, SwiGLU,
  # one bias-free LayerNorm per block, tied head.
  D, L, F, V = 8192, 40, 22528, 256000
  layer = 4 * D * D + 3 * D * F + D
  total = V * D + L * layer + D
  assert total == 34_980_831_232
  mc = model_config("configs/command_r.py", vocab_size=V)
  for got in (counted(mc), analysis.closed_form_params(mc)):
    assert got["total"] == total and got["lm_head"] == 0


def test_mixtral_8x7b_params_and_active():
  # Mixtral 8x7B with its 32000-token vocabulary: 46.7B total, 12.9B active per token.
  D, L, H, KV, hd, F, V, E, k = 4096, 32, 32, 8, 128, 14336, 32000, 8, 2
  attn = D * H * hd + 2 * D * KV * hd + H * hd * D
  expert = 3 * D * F
  layer = attn + E * expert + D * E + 2 * D  # + router + two RMSNorms
  total = V * D + L * layer + D + D * V  # untied head
  active = total - L * (E - k) * expert
  assert (total, active) == (46_702_792_704, 12_879_925_248)
  mc = model_config("configs/mixtral_8x7b.py", vocab_size=V)
  for got in (counted(mc), analysis.closed_form_params(mc)):
    assert got["total"] == total and got["active"] == active
    assert got["embedding"] == V * D and got["lm_head"] == D * V


def test_phi3_mini_params():
  # Phi-3-mini-4k with its 32064-token vocabulary: the published 3.8B (MHA, untied head).
  D, L, F, V = 3072, 32, 8192, 32064
  total = 2 * V * D + L * (4 * D * D + 3 * D * F + 2 * D) + D
  assert total == 3_821_079_552
  mc = model_config("configs/phi3_mini.py", vocab_size=V)
  for got in (counted(mc), analysis.closed_form_params(mc)):
    assert got["total"] == total and got["embedding"] == V * D and got["lm_head"] == D * V


def _fixtures():
  with open(os.path.join(FIXTURES, "versions.json")) as f:
    families = json.load(f)["families"]
  return sorted((name, info["num_parameters"]) for name, info in families.items()
                if "num_parameters" in info)


@pytest.mark.parametrize("name,expected", _fixtures())
def test_hf_fixture_counts_match_transformers(name, expected):
  mc = _hf_model_config(os.path.join(FIXTURES, name))
  got = counted(mc)
  assert got["total"] == expected  # transformers counts tied weights once, as we do
  assert analysis.closed_form_params(mc) == got


def test_flops_by_hand():
  # llama_1b:tiny: D=64, L=2, Hq=4, Hkv=2, hd=16, F=128 (gated), V=1000, causal.
  mc = model_config("configs/llama_1b.py", "tiny", vocab_size=1000)
  T = 64
  qkv = 64 * (4 + 2 * 2) * 16  # 8192
  proj = 4 * 16 * 64  # 4096
  ffn = 3 * 64 * 128  # 24576
  weights = 2 * (qkv + proj + ffn) + 64 * 1000  # 73728 + 64000 = 137728
  attention = 12 * 2 * T * 4 * 16 / 2  # causal halving: 49152
  f = analysis.training_flops_per_token(mc, T)
  assert f["weight_params"] == weights == 137_728
  assert f["weights"] == 6 * 137_728
  assert f["attention"] == attention == 49_152
  assert f["total"] == 6 * 137_728 + 49_152
  # a sliding window of 16 caps the attended length; bidirectional attention is not halved
  assert analysis.training_flops_per_token(mc.replace(sliding_window=16), T)["attention"] \
      == 12 * 2 * 16 * 4 * 16 / 2
  assert analysis.training_flops_per_token(mc.replace(causal=False), T)["attention"] \
      == 12 * 2 * T * 4 * 16


def test_memory_and_kv_cache():
  mc = model_config("configs/llama_1b.py", vocab_size=128256)
  rows = analysis.param_table(auto.build_abstract_model(mc))
  rules = experiment.base_config().mesh.rules
  one = dict(data=1, fsdp=1, tensor=1, expert=1)
  m1 = analysis.training_memory(mc, rows, rules=rules, mesh=one, seq_len=1024, batch=8)
  assert m1["params"] == 1_235_814_400 * 4 and m1["optimizer"] == 2 * m1["params"]
  m8 = analysis.training_memory(mc, rows, rules=rules, mesh=dict(one, fsdp=8), seq_len=1024,
                                batch=8)
  assert m8["params"] < m1["params"] / 7.9  # everything but the small norms is sharded
  assert m8["sequences_per_device"] == 1
  inf = analysis.inference_memory(mc, 1_235_814_400, "bfloat16")  # llama_1b runs in bf16
  assert inf["kv_per_token"] == 2 * 16 * 8 * 64 * 2  # bf16: 32 KiB
  assert inf["kv_at_context"] == inf["kv_per_token"] * 131072


def _run(*args):
  return subprocess.run([sys.executable, "-m", "jaxlm.report", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_cli_json():
  p = _run("--config=configs/llama_1b.py:tiny", "--device=h100", "--json",
           "--mesh=data=2,fsdp=2")
  assert p.returncode == 0, p.stderr
  r = json.loads(p.stdout)
  assert r["parameters"]["closed_form_matches"] is True
  assert r["run"]["num_devices"] == 4
  assert r["roofline"]["step_s"] > 0


@pytest.mark.parametrize("args", [
    ("--config=configs/nope.py",),
    (),
    ("--config=configs/llama_1b.py", f"--hf={FIXTURES}/llama"),
    ("--config=configs/llama_1b.py", "--mesh=data=x"),
    ("--config=configs/llama_1b.py", "--mesh=pipeline=2"),
    ("--config=configs/llama_1b.py", "--device=gpu"),
    (f"--hf={FIXTURES}/nope",),
])
def test_cli_bad_input(args):
  p = _run(*args)
  assert p.returncode == 2
  assert p.stdout == ""
  assert p.stderr.strip().startswith("error:")
  assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_mfu_stays_at_most_1_on_a_matmul_bound_step(tmp_path, tiny_corpus, monkeypatch):
  """A step of big matmuls (so MFU is high) with a start-up peak that read low: the loop
  measures the peak again, and no logged MFU exceeds 1 (it did, at 1.13, when a peak
  measured in a cold process read low)."""
  import json as json_

  from configs import bert_tiny
  from conftest import fresh_workdir
  from jaxlm.train import loop
  cfg = bert_tiny.get_config("tiny")
  cfg.model.update(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  cfg.train.update(steps=8, batch_size=32, log_every=2, eval_every=8)
  cfg.eval.update(max_batches=1, fill_mask_examples=0)
  cfg.checkpoint.every = 8
  calls = []

  def low_peak(dtype):
    calls.append(dtype)
    return (1e9, "measured")  # 1 GFLOP/s: far below any real CPU

  monkeypatch.setattr(analysis, "job_peak_flops", low_peak)
  wd = fresh_workdir(tmp_path, tiny_corpus)
  loop.train(cfg, str(wd))
  mfus = [r["mfu"] for r in map(json_.loads, (wd / "metrics.jsonl").read_text().splitlines())
          if "mfu" in r]
  assert calls and len(mfus) == 4
  assert all(0.05 < m <= 1.0 for m in mfus), mfus


def test_no_committed_result_has_an_mfu_above_1():
  """MFU cannot exceed 1: a result that says so has a wrong peak or FLOPs count."""
  import glob

  def walk(x, path):
    if isinstance(x, dict):
      for k, v in x.items():
        if k == "mfu" and isinstance(v, (int, float)):
          assert v <= 1.0, (path, v)
        walk(v, f"{path}/{k}")
    elif isinstance(x, list):
      for i, v in enumerate(x):
        walk(v, f"{path}[{i}]")

  files = glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))
  assert len(files) > 10
  for f in files:
    with open(f, encoding="utf-8") as fh:
      walk(json.load(fh), os.path.basename(f))
