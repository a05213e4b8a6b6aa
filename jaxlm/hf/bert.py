"""BERT, RoBERTa and DistilBERT checkpoints: config.json and tensor names, both ways.

jaxlm runs all three with one encoder (`jaxlm.models.encoder`), so this module is
mostly naming. A table per family maps jaxlm module paths to HF module paths
("layers.{i}.attn.q" -> "encoder.layer.{i}.attention.self.query"); leaves follow one
rule (Dense kernel <-> transposed Linear weight, LayerNorm scale <-> weight, embedding
<-> weight). The tables are driven by the parameters the jaxlm model actually has, so
every tensor is accounted for both ways.

HF details handled here:
- Head models keep the base model under a prefix ("bert.", "roberta.", "distilbert."),
  bare base models do not; files saved the other way round exist, so on import both
  spellings are accepted for every class. Tensors of other heads are skipped.
- Tied weights (MLM decoder = word embeddings) are left out of HF files and re-tied
  by construction; untied ones are read and written. Untied BERT/RoBERTa heads also
  store the decoder bias twice (`decoder.bias` = `bias`), as transformers does.
- Legacy TF-era names `LayerNorm.gamma` / `LayerNorm.beta` are accepted on import.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError, DataError
from jaxlm.hf.family import Family, Tensors

# jaxlm leaf name -> (HF leaf name, transpose?)
_LEAVES = {"kernel": ("weight", True), "bias": ("bias", False), "scale": ("weight", False),
           "embedding": ("weight", False)}

_BERT_LAYER = {
    "attn.q": "attention.self.query", "attn.k": "attention.self.key",
    "attn.v": "attention.self.value", "attn.o": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm", "mlp.up": "intermediate.dense",
    "mlp.down": "output.dense", "mlp_norm": "output.LayerNorm",
}
_DISTIL_LAYER = {
    "attn.q": "attention.q_lin", "attn.k": "attention.k_lin", "attn.v": "attention.v_lin",
    "attn.o": "attention.out_lin", "attn_norm": "sa_layer_norm", "mlp.up": "ffn.lin1",
    "mlp.down": "ffn.lin2", "mlp_norm": "output_layer_norm",
}
_EMBEDDINGS = {
    "embeddings.word": "embeddings.word_embeddings",
    "embeddings.position": "embeddings.position_embeddings",
    "embeddings.token_type": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
}


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one HF family names things."""

  model_type: str
  prefix: str  # base model inside head models, e.g. "bert."
  layer_prefix: str  # "encoder.layer" | "transformer.layer"
  layer: dict[str, str]  # jaxlm module under layers.{i} -> HF module under layer.{i}
  heads: dict[str, str]  # jaxlm head module -> HF module
  base_classes: tuple[str, ...]  # HF classes that are a bare base model
  base_roots: tuple[str, ...]  # first component of base-model tensor names

  def is_base(self, arch: str) -> bool:
    return arch in self.base_classes


_BERT_MLM = {"mlm": "cls.predictions", "mlm.transform": "cls.predictions.transform.dense",
             "mlm.norm": "cls.predictions.transform.LayerNorm",
             "mlm.decoder": "cls.predictions.decoder"}
BERT = _Spec("bert", "bert.", "encoder.layer", _BERT_LAYER,
             {**_BERT_MLM, "nsp.classifier": "cls.seq_relationship"},
             ("BertModel",), ("embeddings", "encoder", "pooler"))
ROBERTA = _Spec("roberta", "roberta.", "encoder.layer", _BERT_LAYER,
                {"mlm": "lm_head", "mlm.transform": "lm_head.dense",
                 "mlm.norm": "lm_head.layer_norm", "mlm.decoder": "lm_head.decoder"},
                ("RobertaModel",), ("embeddings", "encoder", "pooler"))
DISTILBERT = _Spec("distilbert", "distilbert.", "transformer.layer", _DISTIL_LAYER,
                   {"mlm": "vocab_projector", "mlm.transform": "vocab_transform",
                    "mlm.norm": "vocab_layer_norm", "mlm.decoder": "vocab_projector"},
                   ("DistilBertModel",), ("embeddings", "transformer"))


# ---- names --------------------------------------------------------------------------------
def _hf_module(spec: _Spec, module: str, in_base: bool) -> str | None:
  """HF module path (no prefix) of a jaxlm module path in the base model or in a head."""
  if not in_base:
    return spec.heads.get(module)
  if module in _EMBEDDINGS:
    return _EMBEDDINGS[module]
  if module == "pooler":
    return "pooler.dense"
  m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
  if m and m.group(2) in spec.layer:
    return f"{spec.layer_prefix}.{m.group(1)}.{spec.layer[m.group(2)]}"
  return None


def _to_hf_name(spec: _Spec, arch: str, name: str) -> tuple[str, bool]:
  """jaxlm flat name -> (HF name as transformers writes it, transpose?)."""
  base_model = spec.is_base(arch)
  in_base = base_model or name.startswith("bert.")
  module, _, leaf = (name if base_model else name.removeprefix("bert.")).rpartition(".")
  hf_module = _hf_module(spec, module, in_base) if leaf in _LEAVES else None
  if hf_module is None:
    raise DataError(f"{arch}: no Hugging Face name for jaxlm parameter {name!r}")
  hf_leaf, transpose = _LEAVES[leaf]
  prefix = spec.prefix if in_base and not base_model else ""
  return f"{prefix}{hf_module}.{hf_leaf}", transpose


def _tied_bias_alias(spec: _Spec, hf_name: str) -> str | None:
  """BERT/RoBERTa heads hold their vocab bias twice: `bias` and the tied `decoder.bias`."""
  head = spec.heads["mlm"]
  if spec is not DISTILBERT and hf_name == f"{head}.bias":
    return f"{head}.decoder.bias"
  return None


def _canonical(spec: _Spec, name: str) -> str:
  """An HF tensor name without the base-model prefix and with legacy leaves renamed."""
  name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
  return name.removeprefix(spec.prefix)


def _ignorable(spec: _Spec, canonical: str) -> bool:
  """Tensors HF files may carry that the jaxlm model has no place for and needs none of."""
  if canonical.endswith((".position_ids", ".token_type_ids")):  # legacy saved buffers
    return True
  # Other heads (pooler, classifiers, tied decoder copies) are skipped, as transformers
  # does; an extra or misnamed encoder tensor (a layer too many) is not.
  root = canonical.split(".", 1)[0]
  return root not in spec.base_roots or root == "pooler"


# ---- tensors ------------------------------------------------------------------------------
def params_from_hf(spec: _Spec, tensors: Tensors, cfg: ModelConfig, arch: str,
                   expected: dict[str, tuple]) -> Tensors:
  """HF tensors -> jaxlm flat names; a missing or misshapen tensor is named."""
  by_canonical = {_canonical(spec, name): (name, value) for name, value in tensors.items()}
  out, used = {}, set()
  for name, shape in expected.items():
    hf_name, transpose = _to_hf_name(spec, arch, name)
    key = _canonical(spec, hf_name)
    alias = _tied_bias_alias(spec, key)
    if key not in by_canonical and alias in by_canonical:
      key = alias
    if key not in by_canonical:
      raise DataError(f"{arch}: missing tensor {hf_name!r}")
    source_name, value = by_canonical[key]
    hf_shape = shape[::-1] if transpose else shape
    if tuple(value.shape) != hf_shape:
      raise DataError(f"{arch}: tensor {source_name!r} has shape {tuple(value.shape)}, "
                      f"expected {hf_shape}")
    out[name] = np.asarray(value).T if transpose else np.asarray(value)
    used.add(key)
  extra = sorted(source for canon, (source, _) in by_canonical.items()
                 if canon not in used and not _ignorable(spec, canon))
  if extra:
    raise DataError(f"{arch}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more); "
                    "does config.json match the checkpoint?")
  return out


def params_to_hf(spec: _Spec, tensors: Tensors, cfg: ModelConfig, arch: str) -> Tensors:
  """jaxlm flat names -> HF names and layouts; tied weights are left out, as HF does."""
  del cfg  # the tensors say whether the head is tied (no mlm.decoder) or not
  untied = any(name.startswith("mlm.decoder.") for name in tensors)
  out = {}
  for name, value in tensors.items():
    hf_name, transpose = _to_hf_name(spec, arch, name)
    out[hf_name] = np.ascontiguousarray(value.T if transpose else value)
    alias = _tied_bias_alias(spec, hf_name)
    if alias and untied:  # transformers also writes an untied decoder's own bias
      out[alias] = out[hf_name]
  return out


# ---- config -------------------------------------------------------------------------------
_BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "hidden_act", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
              "layer_norm_eps", "initializer_range", "pad_token_id", "bos_token_id",
              "eos_token_id", "tie_word_embeddings")
# HF config defaults where they differ from ModelConfig's (a key may be absent).
_HF_DEFAULTS = {"bert": {}, "roberta": {"vocab_size": 50265, "pad_token_id": 1,
                                        "bos_token_id": 0, "eos_token_id": 2}}
# DistilBERT's own key names -> ModelConfig fields.
_DISTIL_KEYS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
                "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size",
                "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                "attention_dropout": "attention_probs_dropout_prob",
                "max_position_embeddings": "max_position_embeddings",
                "initializer_range": "initializer_range", "pad_token_id": "pad_token_id",
                "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                "tie_word_embeddings": "tie_word_embeddings"}
_DISTIL_DEFAULTS = {"num_hidden_layers": 6}  # the rest equal ModelConfig's defaults
_DISTIL_EPS = 1e-12  # hard-coded in transformers' DistilBERT


def config_from_hf(spec: _Spec, d: dict) -> ModelConfig:
  """An HF config.json dict -> ModelConfig; features jaxlm lacks are refused by name."""
  if d.get("is_decoder") or d.get("add_cross_attention"):
    raise ConfigError(f"config.json: is_decoder/add_cross_attention: a {spec.model_type} "
                      "decoder is not supported (encoder only)")
  pos = d.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise ConfigError(f"config.json: position_embedding_type={pos!r} is not supported "
                      "(only 'absolute')")
  if spec is DISTILBERT:
    kw = {field: d[key] for key, field in _DISTIL_KEYS.items() if key in d}
    # sinusoidal_pos_embds only changes the init: the table is in the checkpoint.
    return ModelConfig(model_type="distilbert", type_vocab_size=0, layer_norm_eps=_DISTIL_EPS,
                       **{**_DISTIL_DEFAULTS, **kw})
  kw = {k: d[k] for k in _BERT_KEYS if k in d}
  return ModelConfig(model_type=spec.model_type, position_ids_from_mask=spec is ROBERTA,
                     **{**_HF_DEFAULTS[spec.model_type], **kw})


def _check_expressible(spec: _Spec, cfg: ModelConfig) -> None:
  """Refuses configs whose model the HF class would not compute the same way."""
  need = dict(causal=False, norm_type="layernorm", norm_position="post", norm_bias=True,
              embedding_norm=False, mlp_type="plain", mlp_bias=True, attention_bias=True,
              parallel_residual=False, sliding_window=None, position_embedding_type="absolute",
              position_ids_from_mask=spec is ROBERTA, num_local_experts=0)
  bad = {k: getattr(cfg, k) for k, v in need.items() if getattr(cfg, k) != v}
  if cfg.attention_out_bias not in (None, True):
    bad["attention_out_bias"] = cfg.attention_out_bias
  if cfg.kv_heads != cfg.num_attention_heads:
    bad["num_key_value_heads"] = cfg.num_key_value_heads
  if cfg.head_size * cfg.num_attention_heads != cfg.hidden_size:
    bad["head_dim"] = cfg.head_dim
  if (cfg.type_vocab_size == 0) != (spec is DISTILBERT):
    bad["type_vocab_size"] = cfg.type_vocab_size
  if spec is DISTILBERT and cfg.layer_norm_eps != _DISTIL_EPS:
    bad["layer_norm_eps"] = cfg.layer_norm_eps
  if bad:
    key, value = next(iter(bad.items()))
    raise ConfigError(f"model.{key}={value!r} cannot be saved as a Hugging Face "
                      f"{spec.model_type} checkpoint (transformers has no such option)")


def config_to_hf(spec: _Spec, cfg: ModelConfig, arch: str) -> dict:
  """ModelConfig -> a config.json that transformers loads as the same model."""
  _check_expressible(spec, cfg)
  if spec is DISTILBERT:
    out = {key: getattr(cfg, field) for key, field in _DISTIL_KEYS.items()}
    out.update(sinusoidal_pos_embds=False, qa_dropout=0.1, seq_classif_dropout=0.2)
  else:
    out = {k: getattr(cfg, k) for k in _BERT_KEYS}
    out.update(is_decoder=False, add_cross_attention=False)
  out.update(architectures=[arch], model_type=spec.model_type, dtype=cfg.param_dtype)
  return out


def _family(name: str, spec: _Spec, architectures: tuple[str, ...]) -> Family:
  return Family(
      name=name, architectures=architectures,
      config_from_hf=functools.partial(config_from_hf, spec),
      config_to_hf=functools.partial(config_to_hf, spec),
      params_from_hf=functools.partial(params_from_hf, spec),
      params_to_hf=functools.partial(params_to_hf, spec))


FAMILIES = (_family("bert", BERT, ("BertModel", "BertForMaskedLM", "BertForPreTraining")),
            _family("roberta", ROBERTA, ("RobertaModel", "RobertaForMaskedLM")),
            _family("distilbert", DISTILBERT, ("DistilBertModel", "DistilBertForMaskedLM")))
