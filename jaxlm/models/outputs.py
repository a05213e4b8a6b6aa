"""Model outputs: one pytree dataclass whose optional fields grow with new heads."""

from typing import Any

import flax.struct


@flax.struct.dataclass
class ModelOutput:
  # [B, T, V] LM/MLM logits (or [B, P, V] at gathered positions); [B, C] sequence
  # classification, [B, T, C] token classification (C = num_labels)
  logits: Any = None
  nsp_logits: Any = None  # [B, 2] BERT next-sentence logits
  last_hidden_state: Any = None  # [B, T, D]
  pooler_output: Any = None  # [B, D]
  start_logits: Any = None  # [B, T] extractive QA: answer-span start, per position
  end_logits: Any = None  # [B, T] extractive QA: answer-span end
  encoder_last_hidden_state: Any = None  # [B, S, D] encoder-decoder models
  cache: Any = None  # the updated KV cache, when called with one (incremental decoding)
  # With project_logits=False: the LM head's inputs (layers.vocab_loss.Projection) in
  # place of logits, for the fused cross-entropy.
  projection: Any = None
  # Mixture of experts (None for dense models), over all MoE layers:
  aux_loss: Any = None  # load-balancing loss, the Switch/Mixtral formula (unweighted)
  router_z_loss: Any = None  # mean squared router logsumexp (unweighted)
  expert_fraction: Any = None  # [L, E] fraction of routed token slots per expert
