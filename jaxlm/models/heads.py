"""Task heads that sit on top of a base model's hidden states."""

import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, Runtime
from jaxlm.models.base import dtypes
from jaxlm.layers.activations import get_activation
from jaxlm.layers.embed import Embed
from jaxlm.layers.linear import Dense
from jaxlm.layers.norm import LayerNorm
from jaxlm.layers.vocab_loss import Projection


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
        D, V, use_bias=False, init_std=cfg.initializer_range, rngs=rngs, **dt)
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
