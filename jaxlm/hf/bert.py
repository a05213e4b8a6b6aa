"""BERT (BertModel, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification,
BertForTokenClassification, BertForQuestionAnswering), RoBERTa (RobertaModel,
RobertaForMaskedLM, RobertaForSequenceClassification) and DistilBERT (DistilBertModel,
DistilBertForMaskedLM, DistilBertForSequenceClassification): post-LN encoders that jaxlm
runs with one model (`jaxlm.models.encoder`), so this module is mostly naming, one
TensorMap per HF class.

HF details handled here:
- Head models keep the base model under a prefix ("bert.", "roberta.", "distilbert."),
  bare base models do not; files saved the other way round exist, so on import both
  spellings are accepted for every class. Tensors of other heads (and a pooler the class
  lacks) are skipped, as transformers does; an extra encoder tensor (a layer too many) is
  an error.
- Tied weights (MLM decoder = word embeddings) are left out of HF files and re-tied by
  construction; untied ones are read and written. BERT/RoBERTa heads hold their vocab bias
  twice (`decoder.bias` is `bias`): either is read, and the copy is written when the
  decoder is untied, as transformers does.
- Legacy TF-era names `LayerNorm.gamma` / `LayerNorm.beta` are accepted on import.
- Only BertModel, RobertaModel, BertForPreTraining and BertForSequenceClassification have a
  pooler; RoBERTa's and DistilBERT's sequence classifiers have a hidden layer of their own.
- Labels (num_labels, id2label, label2id) and the classifier dropout (`classifier_dropout`,
  DistilBERT's `seq_classif_dropout`) travel in config.json.
"""

from __future__ import annotations

import dataclasses
import functools

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import (TensorMap, check_optional_fields, labels_from_hf, labels_to_hf,
                             map_family)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one HF family names things."""

  model_type: str
  prefix: str  # the base model inside head models, e.g. "bert."
  base_class: str  # the HF class that is a bare base model
  stack: str  # the layer list: "encoder.layer" | "transformer.layer"
  layer: dict[str, str]  # jaxlm module under layers.{i} -> HF module under layer.{i}
  mlm: tuple[str, str, str, str]  # HF MLM head: transform, norm, decoder, vocab bias
  pooler: bool  # whether the base model has one
  # *ForSequenceClassification's head: (HF Linear, jaxlm Dense) pairs (models/heads.py)
  sequence_head: tuple[tuple[str, str], ...]


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
BERT = _Spec("bert", "bert.", "BertModel", "encoder.layer", _BERT_LAYER,
             ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
              "cls.predictions.decoder", "cls.predictions.bias"), pooler=True,
             sequence_head=(("classifier", "classifier.out"),))
ROBERTA = _Spec("roberta", "roberta.", "RobertaModel", "encoder.layer", _BERT_LAYER,
                ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias"),
                pooler=True, sequence_head=(("classifier.dense", "classifier.dense"),
                                            ("classifier.out_proj", "classifier.out")))
DISTILBERT = _Spec("distilbert", "distilbert.", "DistilBertModel", "transformer.layer",
                   _DISTIL_LAYER, ("vocab_transform", "vocab_layer_norm", "vocab_projector",
                                   "vocab_projector.bias"), pooler=False,
                   sequence_head=(("pre_classifier", "classifier.dense"),
                                  ("classifier", "classifier.out")))
# The classes whose base model keeps its pooler (the others drop it, as transformers does).
_WITH_POOLER = ("BertModel", "RobertaModel", "BertForPreTraining",
                "BertForSequenceClassification")


# ---- tensors ------------------------------------------------------------------------------
def tensor_map(spec: _Spec, cfg: ModelConfig, arch: str) -> TensorMap:
  base = arch == spec.base_class  # jaxlm's base models have no "bert." level either
  hp, jp = ("", "") if base else (spec.prefix, "bert.")
  # Skipped on import: buffers old files saved, and anything outside the base model's
  # embeddings and layers (other heads, a pooler this class lacks), as transformers does.
  root = spec.stack.split(".")[0]
  tm = TensorMap(spec.prefix, legacy=[(r"\.gamma$", ".weight"), (r"\.beta$", ".bias")],
                 ignore=[r"\.(position_ids|token_type_ids)$", rf"^(?!(embeddings|{root})\.)"])
  tables = {"word_embeddings": "word", "position_embeddings": "position"}
  if cfg.type_vocab_size:  # DistilBERT has no token types
    tables["token_type_embeddings"] = "token_type"
  for hf, jax in tables.items():
    tm.rename(f"{hp}embeddings.{hf}.weight", f"{jp}embeddings.{jax}.embedding")
  tm.norm(f"{hp}embeddings.LayerNorm", f"{jp}embeddings.norm", bias=True)
  for i in range(cfg.num_hidden_layers):
    for jax, hf in spec.layer.items():
      add = tm.norm if jax.endswith("_norm") else tm.linear
      add(f"{hp}{spec.stack}.{i}.{hf}", f"{jp}layers.{i}.{jax}", bias=True)
  if spec.pooler and arch in _WITH_POOLER:  # a base model saved without one still loads
    tm.linear(f"{hp}pooler.dense", f"{jp}pooler", bias=True,
              optional=arch in ("BertModel", "RobertaModel"))
  if arch.endswith(("ForMaskedLM", "ForPreTraining")):
    transform, norm, decoder, bias = spec.mlm
    tm.linear(transform, "mlm.transform", bias=True)
    tm.norm(norm, "mlm.norm", bias=True)
    if not cfg.tie_word_embeddings:
      tm.linear(decoder, "mlm.decoder", bias=False)
    tm.rename(bias, "mlm.bias")
    if bias != f"{decoder}.bias":  # transformers writes the copy for an untied decoder only
      tm.duplicate(f"{decoder}.bias", of=bias, write=not cfg.tie_word_embeddings)
  if arch == "BertForPreTraining":
    tm.linear("cls.seq_relationship", "nsp.classifier", bias=True)
  heads = {"ForSequenceClassification": spec.sequence_head,
           "ForTokenClassification": (("classifier", "classifier.out"),),
           "ForQuestionAnswering": (("qa_outputs", "qa.out"),)}
  for suffix, pairs in heads.items():
    if arch.endswith(suffix):
      for hf, jax in pairs:
        tm.linear(hf, jax, bias=True)
  return tm


# ---- config -------------------------------------------------------------------------------
_BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "hidden_act", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
              "layer_norm_eps", "initializer_range", "pad_token_id", "bos_token_id",
              "eos_token_id", "tie_word_embeddings", "classifier_dropout")
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
_DISTIL_CLASSIFIER_DROPOUT = 0.2  # seq_classif_dropout's default in transformers
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
                       classifier_dropout=d.get("seq_classif_dropout",
                                                _DISTIL_CLASSIFIER_DROPOUT),
                       **{**_DISTIL_DEFAULTS, **kw}, **labels_from_hf(d))
  kw = {k: d[k] for k in _BERT_KEYS if k in d}
  return ModelConfig(model_type=spec.model_type, position_ids_from_mask=spec is ROBERTA,
                     **{**_HF_DEFAULTS[spec.model_type], **kw}, **labels_from_hf(d))


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
  check_optional_fields(cfg, spec.model_type)


def config_to_hf(spec: _Spec, cfg: ModelConfig, arch: str) -> dict:
  """ModelConfig -> a config.json that transformers loads as the same model."""
  _check_expressible(spec, cfg)
  if spec is DISTILBERT:
    out = {key: getattr(cfg, field) for key, field in _DISTIL_KEYS.items()}
    # DistilBERT has no "use hidden_dropout_prob" fallback: write the rate jaxlm uses.
    classifier = (cfg.hidden_dropout_prob if cfg.classifier_dropout is None
                  else cfg.classifier_dropout)
    out.update(sinusoidal_pos_embds=False, qa_dropout=0.1, seq_classif_dropout=classifier)
  else:
    out = {k: getattr(cfg, k) for k in _BERT_KEYS}
    out.update(is_decoder=False, add_cross_attention=False)
  out.update(architectures=[arch], model_type=spec.model_type, dtype=cfg.param_dtype,
             **labels_to_hf(cfg))
  return out


def _family(spec: _Spec, *architectures: str):
  return map_family(spec.model_type, architectures, functools.partial(config_from_hf, spec),
                    functools.partial(config_to_hf, spec), functools.partial(tensor_map, spec),
                    per_class=True)


FAMILIES = (_family(BERT, "BertModel", "BertForMaskedLM", "BertForPreTraining",
                    "BertForSequenceClassification", "BertForTokenClassification",
                    "BertForQuestionAnswering"),
            _family(ROBERTA, "RobertaModel", "RobertaForMaskedLM",
                    "RobertaForSequenceClassification"),
            _family(DISTILBERT, "DistilBertModel", "DistilBertForMaskedLM",
                    "DistilBertForSequenceClassification"))
