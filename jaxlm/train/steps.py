"""Jitted train and eval steps for the pretraining objectives.

Parameters travel as an nnx.State pytree; the model is rebuilt inside the jitted
function with nnx.merge, which costs nothing at run time. Every objective returns
sums (not means) of its losses and hits, so eval batches aggregate exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.data.objectives import SPAN


def _example_weights(batch):
  return batch.get("example_weight", jnp.ones(batch["input_ids"].shape[0], jnp.float32))


def pretraining_stats(model, batch, rngs=None):
  """BERT: MLM loss at the masked positions plus the NSP loss."""
  out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
              masked_positions=batch["masked_positions"], rngs=rngs)
  ex_w_B = _example_weights(batch)
  logp_BPV = jax.nn.log_softmax(out.logits.astype(jnp.float32))
  labels_BP = batch["masked_ids"]
  nll_BP = -jnp.take_along_axis(logp_BPV, labels_BP[..., None], axis=-1)[..., 0]
  w_BP = batch["masked_weights"] * ex_w_B[:, None]
  nsp_logp_B2 = jax.nn.log_softmax(out.nsp_logits.astype(jnp.float32))
  nsp_nll_B = -jnp.take_along_axis(nsp_logp_B2, batch["nsp_label"][:, None], axis=-1)[:, 0]
  nsp_w_B = batch["nsp_weight"] * ex_w_B
  return {**_router_stats(model, out),
      "mlm_loss_sum": (nll_BP * w_BP).sum(),
      "mlm_correct": ((logp_BPV.argmax(-1) == labels_BP) * w_BP).sum(),
      "mlm_count": w_BP.sum(),
      "nsp_loss_sum": (nsp_nll_B * nsp_w_B).sum(),
      "nsp_correct": ((nsp_logp_B2.argmax(-1) == batch["nsp_label"]) * nsp_w_B).sum(),
      "nsp_count": nsp_w_B.sum(),
  }


def _next_token_stats(logits_BTV, targets_BT, w_BT):
  """Summed NLL, hits and count where w_BT is 1 (teacher-forced token prediction)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  # logsumexp minus the target logit: no [B, T, V] log-softmax kept for the backward pass.
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT
  return {
      "lm_loss_sum": (nll_BT * w_BT).sum(),
      "lm_correct": ((logits_BTV.argmax(-1) == targets_BT) * w_BT).sum(),
      "lm_count": w_BT.sum(),
  }


def causal_lm_stats(model, batch, rngs=None):
  """Causal LM over packed rows: next-token NLL where `loss_weights` is 1 (never across
  a document boundary, never on padding)."""
  out = model(batch["input_ids"], batch["attention_mask"], segment_ids=batch["segment_ids"],
              position_ids=batch["position_ids"], rngs=rngs)
  w_BT = batch["loss_weights"] * _example_weights(batch)[:, None]
  return {**_next_token_stats(out.logits, batch["targets"], w_BT), **_router_stats(model, out)}


def seq2seq_stats(model, batch, rngs=None):
  """Encoder-decoder (T5 span corruption): NLL of the targets given the inputs."""
  out = model(batch["input_ids"], batch["attention_mask"],
              decoder_input_ids=batch["decoder_input_ids"],
              decoder_attention_mask=batch["decoder_attention_mask"], rngs=rngs)
  w_BT = batch["loss_weights"] * _example_weights(batch)[:, None]
  return {**_next_token_stats(out.logits, batch["targets"], w_BT), **_router_stats(model, out)}


def _router_stats(model, out):
  """MoE: the weighted auxiliary losses (added to the loss) and router balance."""
  if out.aux_loss is None:
    return {}
  cfg = model.config
  z = out.router_z_loss if out.router_z_loss is not None else jnp.zeros(())
  return {"moe_loss": cfg.router_aux_loss_coef * out.aux_loss + cfg.router_z_loss_coef * z,
          "router_aux_loss": out.aux_loss, "router_z_loss": z,
          "expert_fraction": out.expert_fraction}


def stats_fn(objective: str):
  return {"causal": causal_lm_stats, SPAN: seq2seq_stats}.get(objective, pretraining_stats)


def loss_from_stats(s):
  moe = s.get("moe_loss", 0.0)
  if "lm_loss_sum" in s:
    return s["lm_loss_sum"] / jnp.maximum(s["lm_count"], 1.0) + moe
  mlm = s["mlm_loss_sum"] / jnp.maximum(s["mlm_count"], 1.0)
  nsp = s["nsp_loss_sum"] / jnp.maximum(s["nsp_count"], 1.0)
  return mlm + nsp + moe


def make_train_step(graphdef, tx: optax.GradientTransformation, *, seed: int, dropout: bool,
                    objective: str = "mlm+nsp"):
  """(params, opt_state, batch, step) -> (params, opt_state, metrics); the dropout key
  is fold_in(seed, step), so a resumed run draws the same masks."""
  stats_of = stats_fn(objective)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch, step):
    def loss_fn(p):
      model = nnx.merge(graphdef, p)
      rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(seed), step)) if dropout else None
      stats = stats_of(model, batch, rngs)
      return loss_from_stats(stats), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **stats}

  return train_step


def make_eval_step(graphdef, objective: str = "mlm+nsp"):
  stats_of = stats_fn(objective)

  @jax.jit
  def eval_step(params, batch):
    stats = stats_of(nnx.merge(graphdef, params), batch)
    return {k: v for k, v in stats.items() if k != "expert_fraction"}  # sums only

  return eval_step
