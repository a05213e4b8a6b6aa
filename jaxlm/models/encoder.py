"""Encoder-only models (BERT, RoBERTa, DistilBERT): embeddings, a stack of the shared
TransformerBlock (models/block.py; post-LN here) and the task heads (models/heads.py).

The three families share one code path; the config says how they differ:
RoBERTa counts positions from the padding id (`position_ids_from_mask`) and has one
token type, DistilBERT has no token types (`type_vocab_size=0`) and no pooler. Their
sequence classifiers differ in layout, which the HF class name fixes (heads.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError
from jaxlm.layers.attention import MaskSpec
from jaxlm.layers.dropout import dropout
from jaxlm.layers.embed import Embed
from jaxlm.layers.linear import Dense
from jaxlm.models.base import (RESIDUAL_AXES, PreTrainedModel, dtypes, rope_spec,
                               router_outputs, run_block)
from jaxlm.models.block import TransformerBlock, norm
from jaxlm.models.heads import (SEQUENCE_HEAD_STYLES, MLMHead, NSPHead, QAHead,
                                SequenceClassificationHead, TokenClassificationHead)
from jaxlm.models.outputs import ModelOutput
from jaxlm.parallel.rules import constrain


def position_ids_from_mask(input_ids_BT, pad_id: int):
  """RoBERTa/fairseq positions: real tokens count pad+1, pad+2, ...; padding sits at pad."""
  real_BT = (input_ids_BT != pad_id).astype(jnp.int32)
  return jnp.cumsum(real_BT, axis=1) * real_BT + pad_id


class Embeddings(nnx.Module):
  """word + learned position (unless rotary) + token type, then LayerNorm and dropout."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(init_std=cfg.initializer_range, rngs=rngs, **dtypes(cfg, rt))
    self.word = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.position = (Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)
                     if cfg.position_embedding_type == "absolute" else None)
    self.token_type = (Embed(cfg.type_vocab_size, cfg.hidden_size, **kw)
                       if cfg.type_vocab_size else None)
    self.norm = norm(cfg)
    self.dropout_rate = cfg.hidden_dropout_prob
    self.pad_id = cfg.pad_token_id if cfg.position_ids_from_mask else None

  def __call__(self, input_ids_BT, token_type_ids_BT=None, position_ids_BT=None, rngs=None):
    if position_ids_BT is None:
      if self.pad_id is not None:
        position_ids_BT = position_ids_from_mask(input_ids_BT, self.pad_id)
      else:
        position_ids_BT = jnp.arange(input_ids_BT.shape[1])[None, :]
    x_BTD = self.word(input_ids_BT)
    if self.position is not None:
      x_BTD = x_BTD + self.position(position_ids_BT)
    # Without a token-type table (DistilBERT) token_type_ids are ignored.
    if self.token_type is not None:
      if token_type_ids_BT is None:
        token_type_ids_BT = jnp.zeros_like(input_ids_BT)
      x_BTD = x_BTD + self.token_type(token_type_ids_BT)
    return dropout(self.norm(x_BTD), self.dropout_rate, rngs)


# Block-layout fields this encoder implements only at their BERT values; anything else
# would be silently ignored, so it is refused.
_ENCODER_FIXED = dict(causal=False, norm_type="layernorm", norm_position="post", norm_bias=True,
                      embedding_norm=False, mlp_type="plain", mlp_bias=True,
                      attention_bias=True, parallel_residual=False, sliding_window=None,
                      layer_types=None, scale_embeddings=False, final_logit_softcapping=None,
                      logit_scale=None)


def _check_encoder_config(cfg: ModelConfig) -> None:
  for key, value in _ENCODER_FIXED.items():
    if getattr(cfg, key) != value:
      raise ConfigError(f"model.{key}={getattr(cfg, key)!r} is not supported by the encoder "
                        f"models (only {value!r})")
  if cfg.position_embedding_type not in ("absolute", "rope"):
    raise ConfigError(f"model.position_embedding_type={cfg.position_embedding_type!r} is not "
                      "supported by the encoder models (absolute or rope)")


class BertModel(PreTrainedModel):
  """Embeddings, a stack of encoder blocks and the [CLS] pooler (BertModel, RobertaModel)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime(),
               add_pooler: bool = True):
    _check_encoder_config(cfg)
    self.config, self.runtime = cfg, runtime
    self.embeddings = Embeddings(cfg, runtime, rngs=rngs)
    self.rope = rope_spec(cfg)
    self.layers = nnx.List([TransformerBlock(cfg, runtime, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.pooler = (Dense(cfg.hidden_size, cfg.hidden_size, init_std=cfg.initializer_range,
                         rngs=rngs, **dtypes(cfg, runtime)) if add_pooler else None)

  def __call__(self, input_ids_BT, attention_mask=None, token_type_ids=None,
               position_ids=None, *, rngs: nnx.Rngs | None = None) -> ModelOutput:
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids_BT)
    mask = MaskSpec.build(input_ids_BT.shape[1], attention_mask=attention_mask)
    x_BTD = self.embeddings(input_ids_BT, token_type_ids, position_ids, rngs=rngs)
    rope = None
    if self.rope is not None:  # RoFormer-style encoders: positions rotate q and k
      if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(input_ids_BT.shape[1]), input_ids_BT.shape)
      rope = self.rope(position_ids)
    for layer in self.layers:
      _, x_BTD = run_block(self.runtime, layer, x_BTD, mask, rope=rope, rngs=rngs)
      x_BTD = constrain(x_BTD, RESIDUAL_AXES)
    pooled_BD = jnp.tanh(self.pooler(x_BTD[:, 0])) if self.pooler is not None else None
    return ModelOutput(last_hidden_state=x_BTD, pooler_output=pooled_BD,
                       **router_outputs(self, attention_mask))


class DistilBertModel(BertModel):
  """DistilBERT's base model: BertModel without the pooler (token types off via config)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    super().__init__(cfg, rngs=rngs, runtime=runtime, add_pooler=False)


def _gather(h_BTD, masked_positions_BP):
  """Hidden states at `masked_positions` [B, P] only, or all of them when None."""
  if masked_positions_BP is None:
    return h_BTD
  return jnp.take_along_axis(h_BTD, masked_positions_BP[..., None], axis=1)


class BertForMaskedLM(PreTrainedModel):
  """Encoder + MLM head, no pooler: BertForMaskedLM, RobertaForMaskedLM, DistilBertForMaskedLM.

  `masked_positions` [B, P] restricts the vocabulary projection to those positions,
  as in BertForPreTraining.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    self.config, self.runtime = cfg, runtime
    self.bert = BertModel(cfg, rngs=rngs, runtime=runtime, add_pooler=False)
    # RobertaLMHead applies exact GELU whatever hidden_act says; BERT and DistilBERT
    # use the config's activation.
    self.mlm = MLMHead(cfg, runtime, activation="gelu" if cfg.model_type == "roberta" else None,
                       rngs=rngs)

  def __call__(self, input_ids_BT, attention_mask=None, token_type_ids=None,
               position_ids=None, *, masked_positions=None, project_logits: bool = True,
               rngs: nnx.Rngs | None = None) -> ModelOutput:
    out = self.bert(input_ids_BT, attention_mask, token_type_ids, position_ids, rngs=rngs)
    head = self.mlm(_gather(out.last_hidden_state, masked_positions),
                    self.bert.embeddings.word, project_logits)
    return out.replace(**{"logits" if project_logits else "projection": head})


class BertForPreTraining(PreTrainedModel):
  """BERT with the MLM head (tied to the word embeddings) and the NSP head.

  `masked_positions` [B, P] restricts the vocabulary projection to those positions:
  the projection over all T positions is a large share of a step and wasted work for
  MLM, whose loss only reads the masked ones.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    self.config, self.runtime = cfg, runtime
    self.bert = BertModel(cfg, rngs=rngs, runtime=runtime)
    self.mlm = MLMHead(cfg, runtime, rngs=rngs)
    self.nsp = NSPHead(cfg, runtime, rngs=rngs)

  def __call__(self, input_ids_BT, attention_mask=None, token_type_ids=None,
               position_ids=None, *, masked_positions=None, project_logits: bool = True,
               rngs: nnx.Rngs | None = None) -> ModelOutput:
    out = self.bert(input_ids_BT, attention_mask, token_type_ids, position_ids, rngs=rngs)
    head = self.mlm(_gather(out.last_hidden_state, masked_positions),
                    self.bert.embeddings.word, project_logits)
    return out.replace(**{"logits" if project_logits else "projection": head},
                       nsp_logits=self.nsp(out.pooler_output))


# ---- fine-tuning heads -----------------------------------------------------------------------
# The HF class fixes its sequence classifier's layout (heads.SEQUENCE_HEAD_STYLES).
_SEQUENCE_STYLE = {"BertForSequenceClassification": "bert",
                   "RobertaForSequenceClassification": "roberta",
                   "DistilBertForSequenceClassification": "distilbert"}


def sequence_head_style(cfg: ModelConfig) -> str:
  """The layout the architecture name fixes; a config without one goes by model_type."""
  arch = (cfg.architectures or [None])[0]
  if arch in _SEQUENCE_STYLE:
    return _SEQUENCE_STYLE[arch]
  return cfg.model_type if cfg.model_type in SEQUENCE_HEAD_STYLES else "bert"


class BertForSequenceClassification(PreTrainedModel):
  """One label distribution per row: BertForSequenceClassification (classifies the
  pooler's output), RobertaForSequenceClassification and DistilBertForSequenceClassification
  (a hidden layer over token 0's state; no pooler).

  Returns ModelOutput with logits [B, num_labels] (float32), last_hidden_state and, for
  BERT, pooler_output. `rngs` turns dropout on (None: deterministic).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    self.config, self.runtime = cfg, runtime
    style = sequence_head_style(cfg)
    self.bert = BertModel(cfg, rngs=rngs, runtime=runtime, add_pooler=style == "bert")
    self.classifier = SequenceClassificationHead(cfg, runtime, style=style, rngs=rngs)

  def __call__(self, input_ids_BT, attention_mask=None, token_type_ids=None,
               position_ids=None, *, rngs: nnx.Rngs | None = None) -> ModelOutput:
    out = self.bert(input_ids_BT, attention_mask, token_type_ids, position_ids, rngs=rngs)
    pooled_BD = (out.pooler_output if out.pooler_output is not None
                 else out.last_hidden_state[:, 0])
    return out.replace(logits=self.classifier(pooled_BD, rngs=rngs))


class BertForTokenClassification(PreTrainedModel):
  """One label distribution per position (NER, tagging): logits [B, T, num_labels]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    self.config, self.runtime = cfg, runtime
    self.bert = BertModel(cfg, rngs=rngs, runtime=runtime, add_pooler=False)
    self.classifier = TokenClassificationHead(cfg, runtime, rngs=rngs)

  def __call__(self, input_ids_BT, attention_mask=None, token_type_ids=None,
               position_ids=None, *, rngs: nnx.Rngs | None = None) -> ModelOutput:
    out = self.bert(input_ids_BT, attention_mask, token_type_ids, position_ids, rngs=rngs)
    return out.replace(logits=self.classifier(out.last_hidden_state, rngs=rngs))


class BertForQuestionAnswering(PreTrainedModel):
  """Extractive QA: start_logits and end_logits [B, T] of the answer span (num_labels=2)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    self.config, self.runtime = cfg, runtime
    self.bert = BertModel(cfg, rngs=rngs, runtime=runtime, add_pooler=False)
    self.qa = QAHead(cfg, runtime, rngs=rngs)

  def __call__(self, input_ids_BT, attention_mask=None, token_type_ids=None,
               position_ids=None, *, rngs: nnx.Rngs | None = None) -> ModelOutput:
    out = self.bert(input_ids_BT, attention_mask, token_type_ids, position_ids, rngs=rngs)
    start_BT, end_BT = self.qa(out.last_hidden_state)
    return out.replace(start_logits=start_BT, end_logits=end_BT)


# Hugging Face class names; RoBERTa and DistilBERT differ from BERT only through the config
# (and, for sequence classification, the head layout the class name fixes).
ARCHITECTURES = {
    "BertForPreTraining": BertForPreTraining,
    "BertModel": BertModel,
    "BertForMaskedLM": BertForMaskedLM,
    "RobertaModel": BertModel,
    "RobertaForMaskedLM": BertForMaskedLM,
    "DistilBertModel": DistilBertModel,
    "DistilBertForMaskedLM": BertForMaskedLM,
    "BertForSequenceClassification": BertForSequenceClassification,
    "RobertaForSequenceClassification": BertForSequenceClassification,
    "DistilBertForSequenceClassification": BertForSequenceClassification,
    "BertForTokenClassification": BertForTokenClassification,
    "BertForQuestionAnswering": BertForQuestionAnswering,
}
