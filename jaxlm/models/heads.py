"""Task heads that sit on top of a base model's hidden states: MLM and NSP for
pre-training; sequence and token classification and extractive QA for fine-tuning, each
laid out as its Hugging Face class does it, so checkpoints map 1:1 (jaxlm/hf/)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError
from jaxlm.layers.activations import get_activation
from jaxlm.layers.dropout import dropout
from jaxlm.layers.embed import Embed
from jaxlm.layers.linear import Dense
from jaxlm.layers.norm import LayerNorm
from jaxlm.layers.vocab_loss import Projection
from jaxlm.models.base import dtypes


class MLMHead(nnx.Module):
  """Masked-LM head: dense -> act -> LayerNorm -> (tied) vocab projection + bias.

  One module serves BERT (`cls.predictions`), RoBERTa (`lm_head`) and DistilBERT
  (`vocab_transform`/`vocab_layer_norm`/`vocab_projector`): they differ only in names
  and, for RoBERTa, in a head activation fixed to exact GELU (`activation`).
  """

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, activation: str | None = None,
               rngs: nnx.Rngs):
    D, V = cfg.hidden_size, cfg.vocab_size
    dt = dtypes(cfg, rt)
    self.transform = Dense(D, D, init_std=cfg.initializer_range, rngs=rngs, **dt)
    # Always a LayerNorm with bias: the head of every BERT-like family has one.
    self.norm = LayerNorm(D, eps=cfg.layer_norm_eps, param_dtype=dt["param_dtype"])
    self.act = get_activation(activation or cfg.hidden_act)
    self.decoder = None if cfg.tie_word_embeddings else Dense(
        D, V, use_bias=False, init_std=cfg.initializer_range, axes=("embed", "vocab"),
        rngs=rngs, **dt)
    self.bias = nnx.Param(jnp.zeros((V,), jnp.dtype(cfg.param_dtype)))

  def __call__(self, h_BPD, word_embeddings: Embed, project_logits: bool = True):
    """Logits [B, P, V], or their Projection when `project_logits` is False."""
    h_BPD = self.norm(self.act(self.transform(h_BPD)))
    proj = (word_embeddings.projection(h_BPD) if self.decoder is None
            else Projection.of_dense(self.decoder, h_BPD))
    proj = proj.replace(bias=self.bias[...])
    return proj.logits() if project_logits else proj


class NSPHead(nnx.Module):
  """Two-way classifier on the pooled [CLS] state: is segment B the true continuation?"""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.classifier = Dense(cfg.hidden_size, 2, init_std=cfg.initializer_range, rngs=rngs,
                            **dtypes(cfg, rt))

  def __call__(self, pooled_BD):
    return self.classifier(pooled_BD)


# ---- fine-tuning heads -----------------------------------------------------------------------
def classifier_dropout_rate(cfg: ModelConfig) -> float:
  """transformers' rule: classifier_dropout when set, else hidden_dropout_prob."""
  return cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout


# Sequence classifiers of the encoder families, as transformers lays them out:
#   style -> (activation of a hidden dense layer or None, dropout before that layer)
#   bert:       pooler output -> dropout -> classifier (the tanh dense is BertModel's pooler)
#   roberta:    token 0 -> dropout -> dense -> tanh -> dropout -> out_proj
#   distilbert: token 0 -> pre_classifier -> ReLU -> dropout -> classifier
SEQUENCE_HEAD_STYLES = {"bert": (None, False), "roberta": ("tanh", True),
                        "distilbert": ("relu", False)}


class SequenceClassificationHead(nnx.Module):
  """One pooled vector per row [B, D] -> logits [B, num_labels], in one of the
  SEQUENCE_HEAD_STYLES; the caller picks the vector (pooler output or token 0)."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, style: str = "bert", rngs: nnx.Rngs):
    if style not in SEQUENCE_HEAD_STYLES:
      raise ConfigError(f"sequence classification head {style!r}: choose one of "
                        f"{sorted(SEQUENCE_HEAD_STYLES)}")
    act, self.dropout_first = SEQUENCE_HEAD_STYLES[style]
    D, kw = cfg.hidden_size, dict(init_std=cfg.initializer_range, rngs=rngs, **dtypes(cfg, rt))
    self.style = style
    self.act = None if act is None else get_activation(act)
    self.dense = None if act is None else Dense(D, D, **kw)
    self.out = Dense(D, cfg.num_labels, **kw)
    self.rate = classifier_dropout_rate(cfg)

  def __call__(self, pooled_BD, rngs: nnx.Rngs | None = None):
    x_BD = pooled_BD
    if self.dense is not None:
      if self.dropout_first:
        x_BD = dropout(x_BD, self.rate, rngs)
      x_BD = self.act(self.dense(x_BD))
    return self.out(dropout(x_BD, self.rate, rngs))


class TokenClassificationHead(nnx.Module):
  """Per-position labels (NER, tagging): dropout -> classifier, [B, T, D] -> [B, T, C]."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.out = Dense(cfg.hidden_size, cfg.num_labels, init_std=cfg.initializer_range,
                     rngs=rngs, **dtypes(cfg, rt))
    self.rate = classifier_dropout_rate(cfg)

  def __call__(self, h_BTD, rngs: nnx.Rngs | None = None):
    return self.out(dropout(h_BTD, self.rate, rngs))


class QAHead(nnx.Module):
  """Extractive QA: qa_outputs Dense(D, 2) -> (start_logits [B, T], end_logits [B, T]).

  transformers sizes qa_outputs by num_labels and then splits it in two, so only
  num_labels=2 works there; anything else is refused here rather than at the split.
  """

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    if cfg.num_labels != 2:
      raise ConfigError(f"model.num_labels={cfg.num_labels}: extractive QA has exactly 2 "
                        "outputs per position (start, end)")
    self.out = Dense(cfg.hidden_size, 2, init_std=cfg.initializer_range, rngs=rngs,
                     **dtypes(cfg, rt))

  def __call__(self, h_BTD):
    logits_BT2 = self.out(h_BTD)
    return logits_BT2[..., 0], logits_BT2[..., 1]


def last_token_positions(input_ids_BT, pad_token_id: int | None):
  """Where decoder classifiers pool, exactly as transformers 5 does it (GPT2/Llama/Mistral
  ForSequenceClassification): each row's rightmost token that is not `pad_token_id`, from
  input_ids alone (the attention mask is not read), so left and right padding both work
  and a pad id inside the text does not cut the row short. A row of padding only gives 0.
  Without a pad id: the last position (transformers then refuses batches of more than
  one row; so does DecoderForSequenceClassification). int32 [B]."""
  B, T = input_ids_BT.shape
  if pad_token_id is None:
    return jnp.full((B,), T - 1, jnp.int32)
  t_BT = jnp.arange(T, dtype=jnp.int32) * (input_ids_BT != pad_token_id).astype(jnp.int32)
  return jnp.argmax(t_BT, axis=-1).astype(jnp.int32)


def pool_at(x_BTC, positions_B):
  """x_BTC[b, positions_B[b]] for every row: [B, C]."""
  return jnp.take_along_axis(x_BTC, positions_B[:, None, None], axis=1)[:, 0]

