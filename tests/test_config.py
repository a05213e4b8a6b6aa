import json

import pytest

from jaxlm import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm import experiment


def test_round_trip(tmp_path):
  cfg = ModelConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, hidden_act="gelu_new")
  cfg.save_pretrained(tmp_path)
  assert ModelConfig.from_pretrained(tmp_path) == cfg
  assert ModelConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
  assert ModelConfig.from_json_file(tmp_path / "config.json").to_dict() == cfg.to_dict()


def test_reads_hugging_face_bert_config(tmp_path):
  hf = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": None, "gradient_checkpointing": False, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 128, "initializer_range": 0.02,
        "intermediate_size": 512, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
        "model_type": "bert", "num_attention_heads": 2, "num_hidden_layers": 2,
        "pad_token_id": 0, "position_embedding_type": "absolute", "torch_dtype": "float32",
        "transformers_version": "4.57.0", "type_vocab_size": 2, "use_cache": True,
        "vocab_size": 30522}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  cfg = ModelConfig.from_pretrained(tmp_path)
  assert (cfg.hidden_size, cfg.num_attention_heads, cfg.architectures) == (
      128, 2, ["BertForMaskedLM"])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(hidden_size=100, num_attention_heads=3), "model.hidden_size (100) must be divisible"),
    (dict(hidden_act="gelu_fancy"), "model.hidden_act"),
    (dict(num_hidden_layers=0), "model.num_hidden_layers"),
    (dict(vocab_size=-5), "model.vocab_size"),
    (dict(hidden_dropout_prob=1.5), "model.hidden_dropout_prob"),
    (dict(num_key_value_heads=5), "model.num_key_value_heads"),
    (dict(num_hidden_layers=2, layer_types=["full_attention"]), "model.layer_types"),
    (dict(num_hidden_layers=1, layer_types=["sliding_attention"]), "model.sliding_window is None"),
    (dict(attn_logit_softcapping=0.0), "model.attn_logit_softcapping"),
    (dict(norm_scale_offset=1.0), "model.norm_scale_offset needs"),
    (dict(sandwich_norm=True), "model.sandwich_norm needs"),
    (dict(rope_local_base_freq=1e4), "model.rope_local_base_freq"),  # not rope, no layer_types
    (dict(position_embedding_type="rope", num_hidden_layers=1, layer_types=["full_attention"],
          rope_local_base_freq=0.0), "model.rope_local_base_freq must be positive"),
    (dict(parallel_shared_norm=True), "model.parallel_shared_norm needs"),
    (dict(logit_scale=0.0), "model.logit_scale"),
    (dict(alibi_style="mpt"), "model.alibi_style"),
])
def test_validation_names_the_key(kwargs, needle):
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    ModelConfig(**kwargs)


def test_unknown_key_is_named():
  with pytest.raises(ConfigError, match="model.hiden_size: unknown"):
    ModelConfig.from_dict({"hiden_size": 10})


def test_experiment_validation():
  c = experiment.base_config()
  c.model.max_position_embeddings = 64
  c.data.max_seq_len = 128
  with pytest.raises(ConfigError, match="data.max_seq_len.*max_position_embeddings"):
    experiment.validate(c)
  c = experiment.base_config()
  c.train.stepz = 3
  with pytest.raises(ConfigError, match="train.stepz: unknown config key"):
    experiment.validate(c)
  c = experiment.base_config()
  c.model.hidden_size = 100
  with pytest.raises(ConfigError, match="divisible"):
    experiment.validate(c)
