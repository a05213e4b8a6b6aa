"""LoRA (jaxlm.peft): the swap leaves outputs alone, only adapters and heads train and hold
optimizer state, merging and saving/loading keep the logits, and bad input is one line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError, DataError
from jaxlm.layers.linear import Dense
from jaxlm.models.auto import build_model
from jaxlm.params import flat_params
from jaxlm.peft import (
  LoRAConfig,
  LoRADense,
  apply_lora,
  count_params,
  load_adapters,
  lora_dropout,
  lora_modules,
  merge_lora,
  save_adapters,
  trainable_filter,
)
from jaxlm.peft.lora import CONFIG_KEY

SMALL = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 32,
         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
LLAMA_KW = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "causal": True,
            "norm_type": "rmsnorm", "norm_position": "pre", "mlp_type": "gated",
            "mlp_bias": False, "attention_bias": False, "hidden_act": "silu",
            "position_embedding_type": "rope", "tie_word_embeddings": False,
            "type_vocab_size": 0}
LLAMA = ModelConfig(**SMALL, **LLAMA_KW, num_key_value_heads=2)  # GQA: v is [32, 16]
BERT = ModelConfig(**SMALL, architectures=["BertForPreTraining"])
IDS = (jnp.arange(2 * 12).reshape(2, 12) * 7 + 3) % 128
MASK = jnp.ones((2, 12), jnp.int32).at[1, 9:].set(0)


def outputs(model) -> dict[str, jax.Array]:
  out = model(IDS, attention_mask=MASK)
  return {k: v for k, v in (("logits", out.logits), ("nsp_logits", out.nsp_logits))
          if v is not None}


CONFIGS = {"llama": LLAMA, "bert": BERT}


def shapes_only(cfg: ModelConfig, lora: LoRAConfig | None = None):
  """The model (adapted by `lora`) with shape-only parameters: for what needs no forward."""
  return nnx.eval_shape(lambda: apply_lora(build_model(cfg), lora) if lora else build_model(cfg))


def train_a_little(model, head_paths=(), steps: int = 3):
  """SGD, with LoRA dropout, on the trainable split only, as a train step would do it;
  returns the gradient state of the first step."""
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(head_paths), ...)
  tx = optax.sgd(0.05)
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, frozen, opt_state, key):
    def loss(t):
      # copy=True: fresh Variables at this trace level (nnx.remat inside the model
      # otherwise fails to update the frozen ones: google/flax#5050).
      net = lora_dropout(nnx.merge(graphdef, t, frozen, copy=True), nnx.Rngs(dropout=key))
      out = net(IDS, attention_mask=MASK)
      extra = 0.0 if out.nsp_logits is None else jnp.mean(out.nsp_logits[:, 0])
      return jnp.mean(jax.nn.log_softmax(out.logits)[..., 5]) + extra
    grads = jax.grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, grads

  first = None
  for i in range(steps):
    trainable, opt_state, grads = step(trainable, frozen, opt_state, jax.random.key(i))
    first = grads if first is None else first
  nnx.update(model, trainable)
  return first


HEADS = {"llama": (), "bert": ("nsp.classifier",)}


@pytest.fixture(scope="module")
def trained():
  """name -> a model adapted on every block linear (+ its head), after a few SGD steps:
  (model, cfg, base parameters, gradients of the first step, outputs)."""
  out = {}
  for name, model_cfg in CONFIGS.items():
    # The decoder rematerializes its blocks, as long-context fine-tuning would.
    model = build_model(model_cfg, runtime=Runtime(remat="full" if name == "llama" else "none"))
    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.05, targets=("q", "k", "v", "o", "mlp"),
                     modules_to_save=HEADS[name])
    base = flat_params(model)
    apply_lora(model, cfg)
    grads = train_a_little(model, cfg.modules_to_save)
    out[name] = (model, cfg, base, grads, outputs(model))
  return out


# ---- the swap ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_apply_lora_swaps_the_targets_and_keeps_the_output(name):
  model = build_model(CONFIGS[name])
  before = outputs(model)
  apply_lora(model, LoRAConfig(rank=4, targets=("q", "v")))
  blocks = model.model.layers if name == "llama" else model.bert.layers
  attn = blocks[1].attn
  assert isinstance(attn.q, LoRADense) and isinstance(attn.v, LoRADense)
  assert type(attn.k) is Dense and type(attn.o) is Dense
  assert attn.v.lora.lora_a.get_value().shape == (32, 4)
  assert attn.v.lora.lora_b.get_value().shape == (4, 16 if name == "llama" else 32)
  assert isinstance(attn.q.lora.lora_a, nnx.LoRAParam)
  after = outputs(model)
  for k in before:  # B starts at zero: the update adds exactly 0
    np.testing.assert_array_equal(after[k], before[k])


def test_aliases_cover_the_blocks_only():
  model = shapes_only(LLAMA, LoRAConfig(targets="all-linear"))
  adapted = {".".join(map(str, p)) for p, _ in lora_modules(model)}
  assert len(adapted) == 2 * 7 and "model.layers.0.mlp.gate" in adapted
  assert type(model.lm_head) is Dense  # outside the blocks
  model = shapes_only(LLAMA, LoRAConfig(targets=("mlp",)))
  assert {p[-1] for p, _ in lora_modules(model)} == {"up", "down", "gate"}


def test_all_linear_on_moe_leaves_the_experts_and_router_alone():
  moe = ModelConfig(**{**SMALL, **LLAMA_KW, "num_local_experts": 4})
  model = shapes_only(moe, LoRAConfig(targets="all_linear"))
  assert {p[-1] for p, _ in lora_modules(model)} == {"q", "k", "v", "o"}
  with pytest.raises(ConfigError, match="'mlp' matches no module .*stacked"):
    shapes_only(moe, LoRAConfig(targets="mlp"))


# ---- what trains ------------------------------------------------------------------------
def test_trainable_count_is_the_formula_and_small():
  r, L = 8, 2
  model = shapes_only(LLAMA, LoRAConfig(rank=r, targets=("q", "v")))
  # q: [32 -> 32]; v: [32 -> 2 kv heads * 8 = 16]
  assert count_params(model, trainable_filter()) == L * (r * (32 + 32) + r * (32 + 16)) == 1792

  bert = shapes_only(BERT, LoRAConfig(rank=r, targets=("q", "v")))
  heads = trainable_filter(("nsp.classifier",), model=bert)
  assert count_params(bert, heads) == L * 2 * r * (32 + 32) + (32 * 2 + 2)

  # Realistic proportions: hidden 256, 4 layers, MHA, vocab 1024.
  big_cfg = ModelConfig(**{**SMALL, **LLAMA_KW, "vocab_size": 1024, "hidden_size": 256,
                           "num_hidden_layers": 4, "intermediate_size": 688})
  total_base = count_params(shapes_only(big_cfg))
  assert total_base == (2 * 1024 * 256 + 4 * (4 * 256 * 256 + 3 * 256 * 688 + 2 * 256)
                        + 256)
  big = shapes_only(big_cfg, LoRAConfig(rank=8, targets=("q", "v")))
  trainable = count_params(big, trainable_filter())
  assert trainable == 4 * 2 * 8 * (256 + 256) == 32768
  assert count_params(big) == total_base + trainable  # LoRAParam is an nnx.Param
  assert trainable / total_base <= 0.02


def test_optimizer_state_exists_for_the_trainables_only():
  model = shapes_only(BERT, LoRAConfig(rank=8, targets=("q", "v")))
  _, trainable, frozen = nnx.split(model, trainable_filter(("nsp.classifier",)), ...)
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  assert n_train == 2 * 2 * 8 * 64 + 66
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, trainable)
  leaves = jax.tree.leaves(opt_state)
  floats = sum(x.size for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
  counters = sum(x.size for x in leaves if not jnp.issubdtype(x.dtype, jnp.floating))
  assert floats == 2 * n_train  # Adam's mu and nu, nothing for the frozen weights
  assert counters == 1  # the step count
  assert sum(x.size for x in jax.tree.leaves(frozen)) > 10 * n_train  # which get none


def test_only_trainables_get_gradients_and_move(trained):
  model, _, base, grads, _ = trained["bert"]
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
  assert names == {f"bert.layers.{i}.{m}.lora.lora_{ab}" for i in range(2)
                   for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")
                   for ab in "ab"} | {"nsp.classifier.kernel", "nsp.classifier.bias"}
  after = flat_params(model)
  for k, v in base.items():  # an adapted Dense's own weights now sit under `.base`
    parent, leaf = k.rsplit(".", 1)
    now = after.get(k, after.get(f"{parent}.base.{leaf}"))
    if k.startswith("nsp.classifier."):
      assert np.abs(now - v).max() > 0, k
    else:
      np.testing.assert_array_equal(now, v, err_msg=k)
  assert np.abs(after["bert.layers.0.attn.q.lora.lora_b"]).max() > 0


# ---- merging ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_merge_keeps_logits_and_restores_the_structure(name, trained):
  model, _, base, _, adapted = trained[name]
  model = nnx.clone(model)
  assert all(np.abs(np.asarray(m.lora.lora_b.get_value())).max() > 0
             for _, m in lora_modules(model))
  merge_lora(model)
  merged = outputs(model)
  for k in adapted:
    np.testing.assert_allclose(merged[k], adapted[k], rtol=0, atol=1e-5)
  assert not lora_modules(model)
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  assert set(flat_params(model)) == set(base)


# ---- saving and loading -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_saved_adapters_reload_to_the_same_logits(name, trained, tmp_path):
  model, cfg, _, _, want = trained[name]
  save_adapters(model, str(tmp_path), cfg, base_model_name_or_path="tiny-base")

  peft = json.loads((tmp_path / "adapter_config.json").read_text())
  assert peft["peft_type"] == "LORA" and peft["r"] == 4 and peft["lora_alpha"] == 8.0
  assert peft["lora_dropout"] == 0.05 and peft["target_modules"] == ["q", "k", "v", "o", "mlp"]
  assert peft["bias"] == "none" and peft["base_model_name_or_path"] == "tiny-base"
  assert peft["task_type"] == ("CAUSAL_LM" if name == "llama" else None)
  assert peft["modules_to_save"] == (list(HEADS[name]) or None)
  assert {"fan_in_fan_out", "inference_mode"} <= set(peft)
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  prefix = "model" if name == "llama" else "bert"
  assert tensors[f"{prefix}.layers.1.attn.o.lora.lora_b"].shape == (4, 32)
  per_layer = 7 if name == "llama" else 6  # gated vs plain MLP
  assert len(tensors) == 2 * per_layer * 2 + 2 * len(HEADS[name])

  fresh = load_adapters(build_model(CONFIGS[name]), str(tmp_path))  # same base weights (seed 0)
  got = outputs(fresh)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert lora_modules(fresh)[0][1].lora_dropout.rate == 0.05

  save_adapters(model, str(tmp_path), cfg)  # a previous adapter may be replaced


def test_save_never_overwrites_other_files(tmp_path):
  cfg = LoRAConfig(rank=2)
  model = apply_lora(build_model(LLAMA), cfg)
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "adapter_config.json").write_text('{"something": "else"}')
  with pytest.raises(DataError, match="refusing to overwrite"):
    save_adapters(model, str(tmp_path / "a"), cfg)
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"not mine")
  with pytest.raises(DataError, match="refusing to overwrite"):
    save_adapters(model, str(tmp_path / "b"), cfg)
  assert (tmp_path / "b" / "adapter_model.safetensors").read_bytes() == b"not mine"


# ---- dropout ----------------------------------------------------------------------------
def test_lora_dropout_only_in_the_training_view():
  model = apply_lora(build_model(LLAMA), LoRAConfig(rank=4, dropout=0.5))
  for _, m in lora_modules(model):
    m.lora.lora_b.set_value(jnp.full(m.lora.lora_b.get_value().shape, 0.05))
  plain = outputs(model)["logits"]
  np.testing.assert_array_equal(outputs(lora_dropout(model, None))["logits"], plain)
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(), ...)

  @jax.jit
  def run(t, key):
    return lora_dropout(nnx.merge(graphdef, t, frozen), nnx.Rngs(dropout=key))(IDS).logits

  a, b = run(trainable, jax.random.key(0)), run(trainable, jax.random.key(1))
  assert np.abs(a - model(IDS).logits).max() > 1e-4 and np.abs(a - b).max() > 1e-4
  np.testing.assert_array_equal(run(trainable, jax.random.key(0)), a)  # deterministic
  np.testing.assert_array_equal(outputs(model)["logits"], plain)  # the model stays off


# ---- bad input --------------------------------------------------------------------------
def test_target_matching_nothing_lists_the_modules():
  with pytest.raises(ConfigError) as e:
    apply_lora(build_model(LLAMA), LoRAConfig(targets=("q", "qq")))
  msg = str(e.value)
  assert "\n" not in msg
  assert msg == (f"{CONFIG_KEY}.targets: 'qq' matches no module; linear modules: attn.q, attn.k, "
                 "attn.v, attn.o, mlp.gate, mlp.up, mlp.down")
  with pytest.raises(ConfigError, match=r"'pooler' matches no module; .*mlp\.down$"):
    apply_lora(build_model(BERT), LoRAConfig(targets="pooler"))  # outside the blocks
  with pytest.raises(ConfigError, match="modules_to_save: 'score' matches no parameter"):
    apply_lora(build_model(LLAMA), LoRAConfig(modules_to_save=("score",)))


@pytest.mark.parametrize("kw, key", [({"rank": 0}, "rank"), ({"alpha": -1.0}, "alpha"),
                                     ({"dropout": 1.0}, "dropout"), ({"targets": ()}, "targets"),
                                     ({"targets": ("q", "")}, "targets")])
def test_bad_config_values(kw, key):
  with pytest.raises(ConfigError, match=f"{CONFIG_KEY}.{key}"):
    LoRAConfig(**kw)
  with pytest.raises(ConfigError, match=f"{CONFIG_KEY}.ranks: unknown key"):
    LoRAConfig.from_dict({"ranks": 4})


def test_bad_adapter_files_are_one_line_errors(tmp_path):
  cfg = LoRAConfig(rank=4)
  save_adapters(apply_lora(build_model(LLAMA), cfg), str(tmp_path), cfg)
  path = tmp_path / "adapter_model.safetensors"
  tensors = load_file(str(path))
  name = "model.layers.0.attn.v.lora.lora_b"
  save_file({**tensors, name: np.zeros((4, 32), np.float32)}, str(path))
  fresh = build_model(LLAMA)
  with pytest.raises(DataError) as e:
    load_adapters(fresh, str(tmp_path))
  assert "\n" not in str(e.value)
  assert str(e.value) == (f"{path}: tensor {name!r} has shape (4, 32), the model expects "
                          "(4, 16)")
  assert not lora_modules(fresh)  # left as it was

  del tensors[name]
  save_file(tensors, str(path))
  with pytest.raises(DataError, match=f"missing tensor '{name}'"):
    load_adapters(fresh, str(tmp_path))
  with pytest.raises(DataError, match="adapter_config.json: no such file"):
    load_adapters(fresh, str(tmp_path / "nowhere"))
