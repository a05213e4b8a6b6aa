"""jaxlm.quantize (compress/quantize.py): storage format, blocked matmul, module swap,
save/load, generation, the report's byte counts and the generate CLI key."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture
from flax import nnx
from safetensors.numpy import load_file

import jaxlm
from jaxlm import experiment
from jaxlm.compress.quantize import (
  QuantConfig,
  QuantDense,
  QuantEmbed,
  dequantize,
  gather_columns,
  make_spec,
  param_bytes,
  qmatmul,
  quantize_weight,
)
from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError, DataError
from jaxlm.layers.embed import Embed
from jaxlm.layers.linear import Dense
from jaxlm.layers.vocab_loss import cross_entropy_sums
from jaxlm.models import auto

RNG = np.random.default_rng(0)
CASES = [("int8", True), ("int4", True), ("int4", False), ("bf16", True)]


def spec_for(mode, K, N, *, symmetric=True, group_size=16, block_size=128):
  return make_spec(QuantConfig(mode, group_size, symmetric, block_size=block_size), K, N, "w")


@pytest.fixture(scope="module")
def gpt2():
  return jaxlm.from_pretrained(fixture("gpt2"))


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(1).integers(3, 250, (2, 12)).astype(np.int32)


# ---- storage format ---------------------------------------------------------------------
def _np_int4_reference(w, G, symmetric):
  """Codes, scales and zeros computed in NumPy from the documented rule."""
  K, N = w.shape
  g = w.reshape(K // G, G, N)
  if symmetric:
    amax = np.abs(g).max(1)
    s = np.where(amax > 0, amax / 7, 1).astype(np.float32)
    return np.clip(np.round(g / s[:, None]), -8, 7).astype(np.int8).reshape(K, N), s, None
  lo, hi = g.min(1), g.max(1)
  s = np.where(hi > lo, (hi - lo) / 15, 1).astype(np.float32)
  z = np.clip(np.round(-lo / s), 0, 15)
  q = np.clip(np.round(g / s[:, None]) + z[:, None], 0, 15).astype(np.uint8).reshape(K, N)
  return q, s, z.astype(np.uint8)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_bytes_hold_two_codes_in_the_documented_order(symmetric):
  K, N, G = 64, 200, 16  # two column blocks, the second padded
  w = RNG.standard_normal((K, N)).astype(np.float32)
  spec = spec_for("int4", K, N, symmetric=symmetric, group_size=G)
  arr = {k: np.asarray(v) for k, v in quantize_weight(w, spec).items()}
  assert arr["qweight"].shape == (2, K // 2, 128)
  assert arr["qweight"].dtype == (np.int8 if symmetric else np.uint8)
  assert arr["scales"].shape == (2, K // G, 128) and arr["scales"].dtype == np.float32
  assert ("zeros" in arr) == (not symmetric)
  q, s, z = _np_int4_reference(w, G, symmetric)
  # Unpack by hand: byte row g*G/2 + j holds rows g*G + j (low) and g*G + G/2 + j (high).
  u = arr["qweight"].view(np.uint8).transpose(1, 0, 2).reshape(K // 2, -1)[:, :N]
  lo, hi = (u & 0xF).astype(np.int16), (u >> 4).astype(np.int16)
  if symmetric:
    lo, hi = np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)
  codes = np.stack([lo.reshape(K // G, G // 2, N), hi.reshape(K // G, G // 2, N)], 1)
  np.testing.assert_array_equal(codes.reshape(K, N), q.astype(np.int16))
  np.testing.assert_allclose(arr["scales"].transpose(1, 0, 2).reshape(K // G, -1)[:, :N], s,
                             rtol=1e-6)
  if not symmetric:
    np.testing.assert_array_equal(arr["zeros"].transpose(1, 0, 2).reshape(K // G, -1)[:, :N], z)
  # Dequantized, every weight is within half a step of the original.
  err = np.abs(np.asarray(dequantize(quantize_weight(w, spec), spec)) - w)
  assert (err.reshape(K // G, G, N) <= s[:, None] / 2 + 1e-6).all()
  assert err.max() > 0.01  # it is lossy: the check above is not vacuous


def test_int8_is_per_output_channel_within_half_a_step():
  K, N = 48, 300
  w = RNG.standard_normal((K, N)).astype(np.float32)
  w[:, 7] = 0.0  # an all-zero column must not divide by zero
  spec = spec_for("int8", K, N)
  arr = quantize_weight(w, spec)
  assert arr["qweight"].dtype == jnp.int8 and arr["qweight"].shape == (3, K, 128)
  s = np.abs(w).max(0) / 127
  back = np.asarray(dequantize(arr, spec))
  assert (np.abs(back - w) <= s / 2 + 1e-6).all() and np.abs(back - w).max() > 1e-4
  assert np.abs(np.asarray(arr["qweight"])).max() == 127 and not back[:, 7].any()


def test_bf16_packs_two_rows_a_word_exactly():
  K, N = 64, 130
  w = RNG.standard_normal((K, N)).astype(np.float32)
  spec = spec_for("bf16", K, N)
  arr = quantize_weight(w, spec)
  assert arr["qweight"].dtype == jnp.uint32 and arr["qweight"].shape == (2, K // 2, 128)
  want = np.asarray(jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(dequantize(arr, spec)), want)


@pytest.mark.parametrize("mode,symmetric", CASES)
@pytest.mark.parametrize("N", [300, 2])
def test_blocked_matmul_equals_the_dequantized_weight(mode, symmetric, N):
  K = 64
  w = RNG.standard_normal((K, N)).astype(np.float32)
  spec = spec_for(mode, K, N, symmetric=symmetric)
  arr = quantize_weight(w, spec)
  x = RNG.standard_normal((2, 3, K)).astype(np.float32)
  y = np.asarray(jax.jit(lambda x, a: qmatmul(x, a, spec))(x, arr))
  want = x @ np.asarray(dequantize(arr, spec))
  assert y.shape == (2, 3, N)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  cols = np.asarray(gather_columns(arr, spec, np.array([[0, N - 1]])))
  np.testing.assert_array_equal(cols[0], np.asarray(dequantize(arr, spec)).T[[0, N - 1]])


# ---- the module swap --------------------------------------------------------------------
def _float_twin(qmodel):
  """A float model holding the quantized model's dequantized weights."""
  twin = auto.build_model(qmodel.config)
  src = dict(nnx.iter_modules(qmodel))
  for path, m in nnx.iter_modules(twin):
    q = src.get(path)
    if isinstance(q, QuantDense):
      m.kernel.set_value(dequantize(q.arrays(), q.spec))
      if q.bias is not None:
        m.bias.set_value(q.bias[...])
    elif isinstance(q, QuantEmbed):
      m.embedding.set_value(dequantize(q.arrays(), q.spec).T)
  float_params = {k: v for k, v in nnx.to_flat_state(nnx.state(qmodel, nnx.Param))
                  if v.get_metadata().get("quant") is None and k[-1] not in ("scales", "zeros")}
  for path, var in nnx.to_flat_state(nnx.state(twin, nnx.Param)):
    if path in float_params:  # norms, biases
      var.set_value(float_params[path].get_value())
  return twin


@pytest.mark.parametrize("mode,symmetric", CASES)
def test_quantized_model_computes_with_exactly_its_quantized_weights(gpt2, ids, mode, symmetric):
  q = jaxlm.quantize(jaxlm.from_pretrained(fixture("gpt2")), mode, 16, symmetric=symmetric)
  kinds = {type(m) for _, m in nnx.iter_modules(q)}
  assert Dense not in kinds and Embed not in kinds and {QuantDense, QuantEmbed} <= kinds
  names = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(q, nnx.Param))]
  assert not [n for n in names if n.endswith((".kernel", ".embedding"))]  # no float copy
  got = np.asarray(q(ids).logits)
  np.testing.assert_allclose(got, np.asarray(_float_twin(q)(ids).logits), rtol=1e-4, atol=1e-4)
  ref = np.asarray(gpt2(ids).logits)
  rel = np.abs(got - ref).max() / np.abs(ref).max()
  assert rel < {"int8": 0.04, "bf16": 0.01, "int4": 0.5}[mode], rel
  assert rel > 1e-5  # the weights did change


def test_untied_head_and_embeddings_false():
  cfg = jaxlm.from_pretrained(fixture("llama")).config.replace(tie_word_embeddings=False)
  model = jaxlm.quantize(auto.build_model(cfg, seed=1), "int8", embeddings=False)
  assert isinstance(model.lm_head, QuantDense) and isinstance(model.model.embed, Embed)
  ids = np.arange(3, 13)[None]
  ref = auto.build_model(cfg, seed=1)(ids).logits
  got = model(ids).logits
  assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) < 0.04
  # The fused loss reads the same head (QuantProjection.w) and agrees with the logits.
  out = model(ids, project_logits=False)
  nll, _ = cross_entropy_sums(out.projection, jnp.asarray(ids), jnp.ones(ids.shape))
  lp = jax.nn.log_softmax(got, -1)
  want = -jnp.take_along_axis(lp, jnp.asarray(ids)[..., None], -1).sum()
  np.testing.assert_allclose(float(nll), float(want), rtol=1e-5)


def test_bytes_fall_3_5x_int8_and_6x_int4_on_the_benchmark_decoder_shape():
  # The shape of runs/compress_teacher (configs/gpt2_small.py:mini), counted abstractly.
  cfg = ModelConfig(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=4096,
                    hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=512, max_position_embeddings=128, causal=True,
                    norm_position="pre", hidden_act="gelu_new")

  def total(**q):
    model = nnx.eval_shape(lambda: jaxlm.quantize(auto.build_model(cfg), **q) if q
                           else auto.build_model(cfg))
    return param_bytes(model)
  f32 = total()
  assert list(f32) == ["float32"]
  int8, int4 = total(mode="int8"), total(mode="int4")
  assert set(int8) == {"int8", "float32"} and set(int4) == {"int4", "uint8", "float32"}
  assert sum(f32.values()) / sum(int8.values()) >= 3.5
  assert sum(f32.values()) / sum(int4.values()) >= 6.0
  assert int4["int4"] * 2 == int8["int8"]  # two codes a byte


def test_bad_input_is_one_line_config_error(gpt2):
  model = jaxlm.from_pretrained(fixture("gpt2"))
  for call, pattern in [
      (lambda: jaxlm.quantize(model, "int3"), r"quantize mode 'int3': choose one of int8"),
      (lambda: jaxlm.quantize(model, "int4", 24),
       r"group_size=24 does not divide the input features of .* \(32\)"),
      (lambda: jaxlm.quantize(model, "int4", 5), r"group_size=5: int4 needs an even group"),
      (lambda: jaxlm.quantize(model, "int8", 0), r"group_size must be a positive integer")]:
    with pytest.raises(ConfigError, match=pattern) as e:
      call()
    assert "\n" not in str(e.value)
  assert any(isinstance(m, Dense) for _, m in nnx.iter_modules(model))  # nothing swapped
  jaxlm.quantize(model, "int8")
  with pytest.raises(ConfigError, match="already quantized \\(int8\\)"):
    jaxlm.quantize(model, "int4", 16)


# ---- files and generation ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_save_and_reload_give_identical_logits_and_greedy_tokens(tmp_path, ids, mode):
  q = jaxlm.quantize(jaxlm.from_pretrained(fixture("gpt2")), mode, 16)
  assert q.save_pretrained(str(tmp_path)) == "jaxlm"
  with open(tmp_path / "config.json", encoding="utf-8") as f:
    qc = json.load(f)["quantization_config"]
  assert qc == {"quant_method": "jaxlm", "format_version": 1, "mode": mode, "group_size": 16,
                "symmetric": False, "embeddings": True, "block_size": 128}
  tensors = load_file(str(tmp_path / "model.safetensors"))
  codes = {tensors[k].dtype for k in tensors if k.endswith(".qweight")}
  assert codes == {np.dtype("uint8" if mode == "int4" else "int8")}
  assert tensors["model.layers.0.mlp.up.qweight"].shape == (
      (1, 16, 128) if mode == "int4" else (1, 32, 128))  # [nb, K(/2), B]: 32 in, 128 out
  assert not [k for k in tensors if k.endswith((".kernel", ".embedding"))]
  back = jaxlm.from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(back(ids).logits), np.asarray(q(ids).logits))
  for model in (q, back):
    assert model.quantization.mode == mode
  np.testing.assert_array_equal(jaxlm.generate(back, ids[:, :6], max_new_tokens=8),
                                jaxlm.generate(q, ids[:, :6], max_new_tokens=8))


def test_bert_heads_quantize_save_and_reload(tmp_path, ids):
  ref = jaxlm.from_pretrained(fixture("bert_pretraining"))
  q = jaxlm.quantize(jaxlm.from_pretrained(fixture("bert_pretraining")), "int8")
  out, want = q(ids), ref(ids)
  for a, b in ((out.logits, want.logits), (out.nsp_logits, want.nsp_logits)):
    assert float(jnp.abs(a - b).max() / jnp.abs(b).max()) < 0.04
  q.save_pretrained(str(tmp_path))
  back = jaxlm.from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(back(ids).logits), np.asarray(out.logits))


def test_foreign_quantization_config_is_refused(tmp_path):
  d = tmp_path / "gptq"
  shutil.copytree(fixture("gpt2"), d)
  raw = json.loads((d / "config.json").read_text())
  raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
  (d / "config.json").write_text(json.dumps(raw))
  with pytest.raises(DataError, match="quant_method='gptq' is not supported"):
    jaxlm.from_pretrained(str(d))


def test_generate_cli_key_and_report_bytes(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  from jaxlm.generate import cli
  from jaxlm.params import flat_params
  from jaxlm.report import build
  d = tmp_path / "gpt2"
  shutil.copytree(fixture("gpt2"), d)
  words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(200)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(d / "tokenizer.json"))
  cfg = experiment.base_config()
  cfg.model.init_from = str(d)
  cfg.generate.quantize = "int4"
  cfg.generate.quantize_group_size = 16
  model, _, _ = cli.load(cfg, str(tmp_path))
  assert model.quantization == QuantConfig("int4", 16)
  cfg.generate.quantize_group_size = 12
  with pytest.raises(ConfigError, match=r"generate.quantize='int4' \(generate.quantize_"
                     r"group_size=12\): quantize group_size=12 does not divide"):
    cli.load(cfg, str(tmp_path))
  cfg.generate.quantize = "int5"
  with pytest.raises(ConfigError, match="generate.quantize must be one of"):
    experiment.validate(cfg)
  # The report counts bytes per dtype, as stored and after --quantize.
  r = build(None, str(d), None, "cpu", 16, 1, "int8")
  f32, int8 = r["parameter_bytes"]["stored"], r["parameter_bytes"]["int8"]
  assert f32 == {"float32": 4 * r["parameters"]["total"]}
  matrices = sum(v.size for k, v in flat_params(jaxlm.from_pretrained(str(d))).items()
                 if k.endswith((".kernel", ".embedding")))
  assert int8["int8"] == matrices  # one byte a weight (no padding: 32- and 128-wide blocks)
  model.save_pretrained(str(tmp_path / "q"))
  stored = build(None, str(tmp_path / "q"), None, "cpu", 16, 1)["parameter_bytes"]
  assert set(stored) == {"stored"} and stored["stored"] == param_bytes(model)
  assert stored["stored"]["int4"] * 2 == int8["int8"]
