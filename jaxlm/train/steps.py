"""Jitted train and eval steps for the pretraining objectives.

Parameters travel as an nnx.State pytree; the model is rebuilt inside the jitted
function with nnx.merge, which costs nothing at run time. Every objective returns
sums (not means) of its losses and hits, so eval batches aggregate exactly.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.data.objectives import SPAN
from jaxlm.layers.vocab_loss import cross_entropy_sums


def _example_weights(batch):
  return batch.get("example_weight", jnp.ones(batch["input_ids"].shape[0], jnp.float32))


def pretraining_stats(model, batch, rngs=None):
  """BERT: MLM loss at the masked positions plus the NSP loss."""
  out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
              masked_positions=batch["masked_positions"], project_logits=False, rngs=rngs)
  ex_w_B = _example_weights(batch)
  w_BP = batch["masked_weights"] * ex_w_B[:, None]
  mlm_loss_sum, mlm_correct = cross_entropy_sums(out.projection, batch["masked_ids"], w_BP)
  nsp_logp_B2 = jax.nn.log_softmax(out.nsp_logits.astype(jnp.float32))
  nsp_nll_B = -jnp.take_along_axis(nsp_logp_B2, batch["nsp_label"][:, None], axis=-1)[:, 0]
  nsp_w_B = batch["nsp_weight"] * ex_w_B
  return {**_router_stats(model, out),
      "mlm_loss_sum": mlm_loss_sum,
      "mlm_correct": mlm_correct,
      "mlm_count": w_BP.sum(),
      "nsp_loss_sum": (nsp_nll_B * nsp_w_B).sum(),
      "nsp_correct": ((nsp_logp_B2.argmax(-1) == batch["nsp_label"]) * nsp_w_B).sum(),
      "nsp_count": nsp_w_B.sum(),
  }


def _next_token_stats(projection, targets_BT, w_BT):
  """Summed NLL, hits and count where w_BT is 1 (teacher-forced token prediction), from
  the fused vocabulary projection and cross-entropy (no [B, T, V] logits kept)."""
  loss_sum, correct = cross_entropy_sums(projection, targets_BT, w_BT)
  return {"lm_loss_sum": loss_sum, "lm_correct": correct, "lm_count": w_BT.sum()}


def causal_lm_stats(model, batch, rngs=None):
  """Causal LM over packed rows: next-token NLL where `loss_weights` is 1 (never across
  a document boundary, never on padding)."""
  out = model(batch["input_ids"], batch["attention_mask"], segment_ids=batch["segment_ids"],
              position_ids=batch["position_ids"], project_logits=False, rngs=rngs)
  w_BT = batch["loss_weights"] * _example_weights(batch)[:, None]
  return {**_next_token_stats(out.projection, batch["targets"], w_BT),
          **_router_stats(model, out)}


def seq2seq_stats(model, batch, rngs=None):
  """Encoder-decoder (T5 span corruption): NLL of the targets given the inputs."""
  out = model(batch["input_ids"], batch["attention_mask"],
              decoder_input_ids=batch["decoder_input_ids"],
              decoder_attention_mask=batch["decoder_attention_mask"], project_logits=False,
              rngs=rngs)
  w_BT = batch["loss_weights"] * _example_weights(batch)[:, None]
  return {**_next_token_stats(out.projection, batch["targets"], w_BT),
          **_router_stats(model, out)}


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


# Denominators of each objective's loss terms, from the batch alone: with gradient
# accumulation every microbatch divides by the full batch's counts, so the summed
# microbatch gradients equal the full batch's gradient.
def _counts(objective: str, batch) -> dict:
  ex_w_B = _example_weights(batch)
  if objective in ("causal", SPAN):
    return {"lm_count": (batch["loss_weights"] * ex_w_B[:, None]).sum()}
  return {"mlm_count": (batch["masked_weights"] * ex_w_B[:, None]).sum(),
          "nsp_count": (batch["nsp_weight"] * ex_w_B).sum()}


# Per-microbatch means rather than sums: averaged over the microbatches.
_MEAN_STATS = ("moe_loss", "router_aux_loss", "router_z_loss", "expert_fraction")


def make_train_step(graphdef, tx: optax.GradientTransformation, *, seed: int, dropout: bool,
                    objective: str = "mlm+nsp", grad_accum_steps: int = 1,
                    out_shardings=None):
  """(params, opt_state, batch, step) -> (params, opt_state, metrics).

  The dropout key is fold_in(seed, step) (and the microbatch index under accumulation),
  so a resumed run draws the same masks. With `grad_accum_steps` = A the batch is split
  into A microbatches whose gradients a scan sums; for dense models this is the full
  batch's gradient up to float summation order. `out_shardings` pins the new params and
  optimizer state to their layout on a mesh.
  """
  stats_of = stats_fn(objective)
  A = grad_accum_steps

  def grads_of(params, batch, key, counts):
    def loss_fn(p):
      model = nnx.merge(graphdef, p)
      stats = stats_of(model, batch, nnx.Rngs(dropout=key) if dropout else None)
      scaled = {**stats, **counts, "moe_loss": stats.get("moe_loss", 0.0) / A}
      return loss_from_stats(scaled), stats

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def train_step(params, opt_state, batch, step):
    key = jax.random.fold_in(jax.random.key(seed), step)
    if A == 1:
      (loss, stats), grads = grads_of(params, batch, key, {})
    else:
      counts = _counts(objective, batch)
      micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)

      def body(carry, i):
        mb = jax.tree.map(lambda x: x[i], micro)
        (loss_i, stats_i), grads_i = grads_of(params, mb, jax.random.fold_in(key, i), counts)
        return jax.tree.map(jnp.add, carry, (loss_i, stats_i, grads_i)), None

      (loss0, stats0), grads0 = jax.eval_shape(
          grads_of, params, jax.tree.map(lambda x: x[0], micro), key, counts)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (loss0, stats0, grads0))
      (loss, stats, grads), _ = jax.lax.scan(body, zeros, jnp.arange(A))
      stats = {k: v / A if k in _MEAN_STATS else v for k, v in stats.items()}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **stats}

  return _compiled_then_trimmed(
      jax.jit(train_step, donate_argnums=(0, 1), out_shardings=out_shardings))


def release_host_memory() -> None:
  """Hands the C heap's free pages back to the OS (glibc malloc_trim; a no-op elsewhere).

  Compiling a train step leaves the compiler's freed memory scattered through the heap, too
  fragmented to hold the step's buffers, which then come on top of it: on CPU, where those
  buffers live in the same memory, a third more peak RSS for nothing."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _compiled_then_trimmed(jitted):
  """`jitted`, compiled ahead of its first run (the compile is cached, so the call that
  follows reuses it) with the compiler's memory released in between."""
  state = {"first": True}

  @functools.wraps(jitted)
  def call(*args):
    if state["first"]:
      jitted.lower(*args).compile()
      release_host_memory()
      state["first"] = False
    return jitted(*args)

  call.lower = jitted.lower
  return call


def make_eval_step(graphdef, objective: str = "mlm+nsp"):
  stats_of = stats_fn(objective)

  @jax.jit
  def eval_step(params, batch):
    stats = stats_of(nnx.merge(graphdef, params), batch)
    return {k: v for k, v in stats.items() if k != "expert_fraction"}  # sums only

  return eval_step
