"""Scaling out, proven on CPU: the same training on 1 device and on meshes of 8 fake
devices (data, FSDP, tensor, expert), real FSDP sharding, restoring a checkpoint under
another mesh, gradient accumulation, remat, bf16 and the mesh's one-line errors.

The 8-device runs need XLA_FLAGS set before JAX starts, so they run in a subprocess
(tests/mesh_worker.py) next to a 1-device one; both start once per module.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxlm import Runtime, experiment, tasks
from jaxlm.errors import ConfigError
from jaxlm.models import auto
from jaxlm.parallel.mesh import mesh_shape
from jaxlm.train.optim import make_optimizer
from jaxlm.train.steps import make_train_step

from configs import bert_tiny, llama_1b, t5_small
from conftest import REPO, dot_types_in

MODELS = {"decoder": "configs/llama_1b.py:tiny", "bert": "configs/bert_tiny.py:tiny"}
MESHES = {
    "data8": {"mesh.data": 8},
    "fsdp8": {"mesh.data": 1, "mesh.fsdp": 8},
    "d2f2t2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    "tensor8": {"mesh.data": 1, "mesh.tensor": 8},
}
SHORT = {"train.steps": 5, "train.eval_every": 5, "train.log_every": 1,
         "checkpoint.every": 5, "eval.max_batches": 1, "eval.samples": 0,
         "eval.fill_mask_examples": 0}


def _run(name, model, workdir, **overrides):
  return {"name": name, "config": MODELS.get(model, model), "workdir": str(workdir),
          "overrides": {**SHORT, **overrides}}


def _start_worker(tmp, devices: int, data, runs):
  spec, out = tmp / f"spec{devices}.json", tmp / f"out{devices}.json"
  spec.write_text(json.dumps({"data": str(data), "runs": runs}))
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, str(REPO / "tests/mesh_worker.py"), str(spec),
                           str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  return proc, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
  """{run name: {"losses", "val_loss", "workdir", ...}} from both workers."""
  tmp = tmp_path_factory.mktemp("mesh")
  data = tmp / "data"
  shutil.copytree(tiny_corpus, data)
  one = [_run(f"{m}/1", m, tmp / f"{m}_1") for m in MODELS]
  one += [_run(f"bert/{p}", "bert", tmp / f"bert_{p}", **{"train.precision": p,
                                                          "train.steps": 10})
          for p in ("fp32", "bf16")]
  eight = [_run(f"{m}/{mesh}", m, tmp / f"{m}_{mesh}", **MESHES[mesh])
           for m in MODELS for mesh in MESHES]
  eight[1]["check_sharding"] = True  # decoder/fsdp8
  eight.append(_run("mixtral/expert4", "configs/mixtral_tiny.py", tmp / "mixtral",
                    **{"mesh.data": 2, "mesh.expert": 4}))
  # Cross-mesh restore: 6 steps on data=8; then the same workdir without its step-6
  # checkpoint resumes from step 3 on fsdp=2 x tensor=4.
  restore = dict(**MESHES["data8"], **{"train.steps": 6, "checkpoint.every": 3})
  eight.append(_run("restore/data8", "decoder", tmp / "restore", **restore))
  eight.append({**_run("restore/f2t4", "decoder", tmp / "restore",
                       **{**restore, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4}),
                "keep_workdir": True, "remove": ["checkpoints/6", "model"]})
  workers = [_start_worker(tmp, 1, data, one), _start_worker(tmp, 8, data, eight)]
  results = {}
  for proc, out in workers:
    try:
      log, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
      proc.kill()
      raise
    assert proc.returncode == 0, log[-4000:]
    results.update(json.loads(out.read_text()))
  for run in one + eight:
    results[run["name"]]["workdir"] = Path(run["workdir"])
  return results


def weights(workdir):
  return load_file(str(workdir / "model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_meshes_train_like_one_device(runs, model, mesh):
  base, got = runs[f"{model}/1"], runs[f"{model}/{mesh}"]
  assert base["devices"] == 1 and got["devices"] == 8
  assert len(got["losses"]) == 5
  np.testing.assert_allclose(got["losses"], base["losses"], rtol=1e-5)
  a, b = weights(base["workdir"]), weights(got["workdir"])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=2e-6, err_msg=k)


@pytest.mark.slow
def test_fsdp_shards_every_large_parameter_and_moment(runs):
  sharding = runs["decoder/fsdp8"]["sharding"]
  assert sum(k.startswith("param:") for k in sharding) >= 10
  assert sum(k.startswith("moment:") for k in sharding) >= 20  # Adam's mu and nu
  for name, fractions in sharding.items():
    assert fractions == [1 / 8], (name, fractions)


@pytest.mark.slow
def test_mixtral_trains_on_an_expert_mesh(runs):
  losses = runs["mixtral/expert4"]["losses"]
  assert len(losses) == 5 and all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.slow
def test_checkpoint_restores_under_another_mesh(runs):
  full, resumed = runs["restore/data8"], runs["restore/f2t4"]
  assert len(full["losses"]) == 6
  # The second run really restored step 3 (the step-6 checkpoint was removed); one that
  # started over would log the same losses, training being deterministic.
  assert full["resumed_from"] is None and resumed["resumed_from"] == 3
  # metrics.jsonl keeps steps 1-3 of the first run and steps 4-6 of the resumed one.
  np.testing.assert_allclose(resumed["losses"], full["losses"], rtol=1e-5)


@pytest.mark.slow
def test_bf16_matches_fp32_validation_loss(runs):
  fp32, bf16 = runs["bert/fp32"]["val_loss"], runs["bert/bf16"]["val_loss"]
  # Close, and not equal: an ignored train.precision would give the fp32 number exactly.
  assert 1e-5 < abs(bf16 - fp32) / fp32 < 0.02, (fp32, bf16)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_precision_reaches_the_compiled_step(precision):
  """train.precision=bf16 puts bf16 dots (forward and backward) in the lowered train
  step, with f32 parameters; fp32 has none."""
  cfg = bert_tiny.get_config("tiny")
  cfg.train.precision = precision
  mc = experiment.validate(cfg).replace(vocab_size=128)
  model = auto.build_model(mc, runtime=experiment.runtime(cfg), seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  tx, _ = make_optimizer(cfg.train)
  step = make_train_step(graphdef, tx, tasks.get("mlm+nsp"), seed=0, dropout=False)
  rng, B, T, P = np.random.default_rng(0), 4, 64, 10
  batch = {"input_ids": rng.integers(5, 128, (B, T)), "token_type_ids": np.zeros((B, T)),
           "attention_mask": np.ones((B, T)), "masked_positions": np.tile(np.arange(P), (B, 1)),
           "masked_ids": rng.integers(5, 128, (B, P)), "masked_weights": np.ones((B, P)),
           "nsp_label": np.ones(B), "nsp_weight": np.ones(B)}
  batch = {k: v.astype(np.float32 if "weight" in k else np.int32) for k, v in batch.items()}
  types = dot_types_in(step.lower(params, tx.init(params), batch, 0).as_text())
  n16 = types.count("bf16")
  assert n16 == 0 if precision == "fp32" else n16 >= 0.75 * len(types) > 20, types


# ---- in-process (one device) --------------------------------------------------------------
def _causal_batch(rng, B, T, V):
  return {"input_ids": rng.integers(2, V, (B, T)).astype(np.int32),
          "attention_mask": np.ones((B, T), np.int32), "segment_ids": np.ones((B, T), np.int32),
          "position_ids": np.tile(np.arange(T), (B, 1)).astype(np.int32),
          "targets": rng.integers(2, V, (B, T)).astype(np.int32),
          "loss_weights": (rng.random((B, T)) > 0.3).astype(np.float32)}


def test_grad_accumulation_equals_the_large_batch():
  cfg = llama_1b.get_config("tiny")
  mc = experiment.validate(cfg).replace(vocab_size=128, pad_token_id=0, eos_token_id=1)
  batch = _causal_batch(np.random.default_rng(0), 16, 16, 128)
  out = {}
  for accum in (1, 4):
    graphdef, params = nnx.split(auto.build_model(mc, seed=0), nnx.Param)
    tx, _ = make_optimizer(cfg.train)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, tasks.get("causal"), seed=0, dropout=False,
                           grad_accum_steps=accum)
    losses = []
    for s in range(3):
      params, opt_state, m = step(params, opt_state, batch, s)
      losses.append(float(m["loss"]))
    out[accum] = (losses, float(m["grad_norm"]), float(m["lm_count"]), params)
  np.testing.assert_allclose(out[4][0], out[1][0], rtol=1e-5)
  np.testing.assert_allclose(out[4][1], out[1][1], rtol=1e-5)
  assert out[4][2] == out[1][2]  # summed token counts
  for a, b in zip(jax.tree.leaves(out[1][3]), jax.tree.leaves(out[4][3])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mod", [llama_1b, bert_tiny, t5_small], ids=lambda m: m.__name__)
def test_remat_policies_give_the_same_gradients(mod):
  base = experiment.model_config(mod.get_config("tiny")).replace(vocab_size=128,
                                                                 hidden_dropout_prob=0.1)
  ids = jnp.asarray(np.random.default_rng(0).integers(5, 100, (2, 16)), jnp.int32)
  grads, saved = {}, {}
  for remat in ("none", "full", "dots"):
    model = auto.build_model(base, runtime=Runtime(remat=remat), seed=0)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
      model = nnx.merge(graphdef, p)
      kw = {"decoder_input_ids": ids} if mod is t5_small else {}
      return model(ids, rngs=nnx.Rngs(dropout=1), **kw).logits.std()  # dropout on

    grads[remat] = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
    # What the backward pass keeps: the residuals the VJP closes over.
    residuals = jax.tree.leaves(jax.vjp(loss, params)[1])
    saved[remat] = sum(x.size * x.dtype.itemsize for x in residuals)
  # Remat really changes it: "full" keeps only block inputs, "dots" adds the matmul outputs.
  assert saved["full"] < saved["dots"] < saved["none"], saved
  for remat in ("full", "dots"):
    for a, b in zip(grads["none"], grads[remat]):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


# ---- errors ----------------------------------------------------------------------------------
def _mesh(**kw):
  return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1, **kw})


def test_mesh_shapes_and_errors():
  assert mesh_shape(_mesh(), 8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
  assert mesh_shape(_mesh(fsdp=2, tensor=2), 8)["data"] == 2
  with pytest.raises(ConfigError, match=r"mesh: data=-1 x fsdp=3 .* does not divide the 8"):
    mesh_shape(_mesh(fsdp=3), 8)
  with pytest.raises(ConfigError, match=r"needs 4 devices, but there are 8"):
    mesh_shape(_mesh(data=2, fsdp=2), 8)
  with pytest.raises(ConfigError, match="at most one -1"):
    mesh_shape(_mesh(fsdp=-1), 8)


def test_batch_must_split_over_the_data_parallel_devices():
  cfg = llama_1b.get_config("tiny")
  cfg.mesh.update(data=1, fsdp=4, tensor=2)
  experiment.check_mesh(cfg, num_devices=8)  # 16 rows over 4 data-parallel devices
  cfg.train.batch_size = 6
  with pytest.raises(ConfigError, match=r"train.batch_size \(6\) .* 4 data-parallel"):
    experiment.check_mesh(cfg, num_devices=8)
  cfg.train.update(batch_size=16, grad_accum_steps=8)
  with pytest.raises(ConfigError, match="train.grad_accum_steps"):
    experiment.check_mesh(cfg, num_devices=8)
  cfg.train.grad_accum_steps = 1
  cfg.mesh.rules = (("batch", "pipeline"),)
  with pytest.raises(ConfigError, match="unknown mesh axis 'pipeline'"):
    experiment.check_mesh(cfg, num_devices=8)
