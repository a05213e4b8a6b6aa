"""jaxlm.from_pretrained / save_pretrained for jaxlm exports: the runtime is the caller's
choice, never saved; exports written before the runtime left ModelConfig still load."""

import json
import os

import numpy as np
import pytest

import jaxlm
from conftest import REPO
from jaxlm import ModelConfig, Runtime
from jaxlm.params import flat_params

OLD_EXPORT = os.path.join(REPO, "tests", "fixtures", "jaxlm_export_v0")


def test_old_export_with_runtime_keys_still_loads():
  raw = json.load(open(os.path.join(OLD_EXPORT, "config.json")))
  assert raw["dtype"] == "bfloat16" and "attention_impl" in raw  # the old format
  want = np.load(os.path.join(OLD_EXPORT, "expected.npz"))
  # Its old runtime (bf16 compute), now chosen by the caller: the same numbers exactly.
  model = jaxlm.from_pretrained(OLD_EXPORT, dtype="bfloat16")
  assert model.runtime == Runtime(dtype="bfloat16")
  out = model(want["input_ids"])
  np.testing.assert_array_equal(np.asarray(out.logits, np.float32), want["logits"])
  np.testing.assert_array_equal(np.asarray(out.nsp_logits, np.float32), want["nsp_logits"])
  # Default runtime: float32 compute, close to the bf16 numbers but not equal.
  f32 = jaxlm.from_pretrained(OLD_EXPORT)
  assert f32.runtime == Runtime() and f32.config.position_embedding_type == "rope"
  logits = np.asarray(f32(want["input_ids"]).logits)
  assert not np.array_equal(logits, want["logits"])
  np.testing.assert_allclose(logits, want["logits"], atol=0.05 * np.abs(logits).max())


def test_export_round_trip_saves_no_runtime(tmp_path):
  cfg = ModelConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=32,
                    position_embedding_type="rope", architectures=["BertForPreTraining"])
  model = jaxlm.build_model(cfg, runtime=Runtime(dtype="bfloat16", remat="full"), seed=1)
  assert model.save_pretrained(str(tmp_path)) == "jaxlm"  # rotary BERT: no HF class for it
  raw = json.load(open(tmp_path / "config.json"))
  assert raw["jaxlm_export"] == 1
  assert not {"dtype", "attention_impl", "remat"} & set(raw)
  back = jaxlm.from_pretrained(str(tmp_path), attention_impl="xla")
  assert back.config == cfg and back.runtime == Runtime()
  for name, value in flat_params(model).items():
    np.testing.assert_array_equal(flat_params(back)[name], value, err_msg=name)


def test_runtime_choices_are_checked():
  with pytest.raises(jaxlm.ConfigError, match="model.remat must be one of"):
    Runtime(remat="some")
  with pytest.raises(jaxlm.ConfigError, match="model.dtype must be one of"):
    jaxlm.from_pretrained(OLD_EXPORT, dtype="int4")
  with pytest.raises(jaxlm.ConfigError, match="unknown ModelConfig key"):
    ModelConfig.from_dict({"hidden_sizes": 3})
