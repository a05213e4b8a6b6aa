"""`distill`: knowledge distillation (DistilBERT's recipe) of a frozen teacher into a
student that shares its tokenizer.

The student minimizes

  alpha_hard * NLL(true tokens) + alpha_kl * T^2 * KL(p_teacher^T || p_student^T)
  + alpha_cos * (1 - cos(h_student, h_teacher))

over the positions its own objective scores: next tokens for a decoder (`causal`), masked
tokens for a BERT-style encoder (`mlm`); which one follows from the student's
architecture. p^T is the softmax of logits / T. The KL is fused with both vocabulary
projections and walks the positions in chunks (`kl_sum`), like the fused cross-entropy
(layers/vocab_loss.py): no [B, T, V] pair of logits is ever kept. The cosine term
compares the last hidden states at every real token (it needs equal hidden sizes).

The teacher (`distill.teacher`: a jaxlm workdir or export, or a Hugging Face directory,
read by `from_pretrained`) is the frozen part of the trained model (`Distiller`): it gets
no gradients, no optimizer state and no checkpoint; its outputs are also stop_gradient'ed.
The data use the teacher's tokenizer, the student its vocabulary size; the export is the
student alone, with that tokenizer. `distill.init_from_teacher_layers` starts student
layer i as teacher layer 2i (embeddings, norms and heads copied too).

Validation `loss` is the student's own NLL on the true tokens, so a distilled student
compares directly with one trained from scratch; `kl` (KL at temperature T, unscaled)
and `cosine_loss` are reported next to it.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.layers.linear import _product, materialize
from jaxlm.layers.vocab_loss import CHUNK_LOGITS, MAX_CHUNKS, Projection
from jaxlm.models import decoder
from jaxlm.params import path_name
from jaxlm.pretrained import from_pretrained, load_config, resolve_dir
from jaxlm.tasks import base
from jaxlm.tasks.base import Task, example_weights, fmt, mean_loss, register
from jaxlm.tasks.causal import CausalLM
from jaxlm.tasks.mlm import MLM

# Student architectures per kind of objective: decoders, and encoders with an MLM head.
MLM_ARCHITECTURES = ("BertForPreTraining", "BertForMaskedLM", "RobertaForMaskedLM",
                     "DistilBertForMaskedLM")
KINDS = {"causal": tuple(decoder.ARCHITECTURES), "mlm": MLM_ARCHITECTURES}
KIND_WORDS = {"causal": "a decoder-only (causal) LM", "mlm": "a masked-LM encoder"}
# ModelConfig fields that fix the shapes of the tensors init_from_teacher_layers copies.
LAYER_SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "mlp_type", "mlp_bias", "attention_bias",
                    "norm_type", "norm_bias", "position_embedding_type",
                    "max_position_embeddings", "type_vocab_size", "tie_word_embeddings",
                    "num_local_experts")
_DEFAULT_VOCAB = ModelConfig().vocab_size


class Distiller(nnx.Module):
  """The trained model of a distillation run: the student, and the teacher as the frozen
  part (Task.trainable selects the student). The loop reads the student's config."""

  def __init__(self, student: nnx.Module, teacher: nnx.Module):
    self.student, self.teacher = student, teacher
    self.config, self.runtime = student.config, student.runtime


# ---- the fused, chunked KL -------------------------------------------------------------
def kl_sum(student: Projection, teacher: Projection, weights_BT, temperature: float):
  """Σ weights · KL(softmax(teacher / T) || softmax(student / T)) over positions, from the
  two vocabulary projections, a chunk of positions at a time. Differentiable in the
  student's h, W and bias (computed in the forward pass, as in vocab_loss); the teacher
  gets zero cotangents."""
  B, T, _ = student.h.shape
  if student.softcap is not None or teacher.softcap is not None:
    raise ConfigError("distill: final_logit_softcapping (Gemma 2) is not supported by the "
                      "fused KL; distill from and into models without it")
  if student.scale is not None or teacher.scale is not None:
    raise ConfigError("distill: logit_scale (Cohere) is not supported by the fused KL; "
                      "distill from and into models without it")
  V = _vocab(student)
  if _vocab(teacher) != V:
    raise ConfigError(f"distill: the student's vocabulary has {V} entries, the teacher's "
                      f"{_vocab(teacher)}; they must share one tokenizer")
  # Two [chunk, V] logits live at once (student and teacher).
  chunk = max(1, min(T, max(CHUNK_LOGITS // max(1, 2 * B * V), -(-T // MAX_CHUNKS))))
  static = (_spec(student), _spec(teacher), chunk, float(temperature))
  zero = jnp.zeros((0,), jnp.float32)
  return _fused_kl(static, student.h, student.w,
                   zero if student.bias is None else student.bias, teacher.h, teacher.w,
                   zero if teacher.bias is None else teacher.bias,
                   weights_BT.astype(jnp.float32))


def _vocab(p: Projection) -> int:
  return p.w.shape[0] if p.vocab_major else p.w.shape[1]


def _spec(p: Projection):
  return (p.vocab_major, jnp.dtype(p.dtype), p.bias is not None)


def _logits(spec, h_ND, w, bias):
  """[N, V] float32 logits of one chunk (w already in the compute dtype)."""
  vocab_major, dtype, has_bias = spec
  out = _product(h_ND.astype(dtype), w, transpose_w=vocab_major)
  return out + bias.astype(jnp.float32) if has_bias else out


def _kl_forward(static, hs, ws, bs, ht, wt, bt, w_BT, grads: bool):
  s_spec, t_spec, chunk, temp = static
  ws, wt = ws.astype(s_spec[1]), wt.astype(t_spec[1])
  B, T, D = hs.shape
  total = jnp.zeros((), jnp.float32)
  dh, dw_DV, db = [], None, None
  for t0 in range(0, T, chunk):
    t1 = min(t0 + chunk, T)
    hs_ND = hs[:, t0:t1].reshape(-1, D)
    ls_NV = jax.nn.log_softmax(_logits(s_spec, hs_ND, ws, bs) / temp, axis=-1)
    lt_NV = jax.nn.log_softmax(
        _logits(t_spec, ht[:, t0:t1].reshape(B * (t1 - t0), -1), wt, bt) / temp, axis=-1)
    pt_NV = jnp.exp(lt_NV)
    w_N = w_BT[:, t0:t1].reshape(-1)
    total = total + ((pt_NV * (lt_NV - ls_NV)).sum(-1) * w_N).sum()
    if not grads:
      continue
    # d KL / d student logits = (p_student - p_teacher) / T, per weighted position.
    dl_NV = (jnp.exp(ls_NV) - pt_NV) * (w_N / temp)[:, None]
    dl = dl_NV.astype(s_spec[1])
    dh.append(_product(dl, ws, transpose_w=not s_spec[0]).reshape(B, t1 - t0, D))
    dw_c = jnp.matmul(materialize(hs_ND.astype(s_spec[1]).T), dl,
                      preferred_element_type=jnp.float32)
    dw_DV = dw_c if dw_DV is None else dw_DV + dw_c
    if s_spec[2]:
      db = dl_NV.sum(0) if db is None else db + dl_NV.sum(0)
  if not grads:
    return total, None
  dh_BTD = dh[0] if len(dh) == 1 else jnp.concatenate(dh, axis=1)
  dw = materialize(materialize(dw_DV).T) if s_spec[0] else dw_DV
  return total, (dh_BTD, dw, db)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_kl(static, hs, ws, bs, ht, wt, bt, w_BT):
  return _kl_forward(static, hs, ws, bs, ht, wt, bt, w_BT, grads=False)[0]


def _fused_kl_fwd(static, hs, ws, bs, ht, wt, bt, w_BT):
  total, grads = _kl_forward(static, hs, ws, bs, ht, wt, bt, w_BT, grads=True)
  like = (jnp.zeros((0,), hs.dtype), jnp.zeros((0,), ws.dtype), jnp.zeros_like(bs))
  return total, (grads, like, (ht, wt, bt), w_BT)


def _fused_kl_bwd(static, res, g):
  (dh, dw, db), (h_like, w_like, b_zero), teacher, w_BT = res
  d_bias = b_zero if db is None else (g * db).astype(b_zero.dtype)
  return ((g * dh).astype(h_like.dtype), (g * dw).astype(w_like.dtype), d_bias,
          *(jnp.zeros_like(x) for x in teacher), jnp.zeros_like(w_BT))


_fused_kl.defvjp(_fused_kl_fwd, _fused_kl_bwd)


def cosine_sum(hs_BTD, ht_BTD, weights_BT):
  """Σ weights · (1 - cos(student, teacher)) of hidden states (DistilBERT's cosine loss)."""
  hs, ht = hs_BTD.astype(jnp.float32), ht_BTD.astype(jnp.float32)
  norms_BT = jnp.linalg.norm(hs, axis=-1) * jnp.linalg.norm(ht, axis=-1)
  cos_BT = (hs * ht).sum(-1) / jnp.maximum(norms_BT, 1e-8)
  return ((1.0 - cos_BT) * weights_BT).sum()


# ---- the student from every other teacher layer ------------------------------------------
def init_from_teacher_layers(student: nnx.Module, teacher: nnx.Module, source: str,
                             log=print) -> dict[str, list[str]]:
  """Copies the teacher's parameters into the student by name, student layer i from
  teacher layer 2i; returns (and logs) the names left as initialized."""
  theirs = {path_name(p): v for p, v in nnx.to_flat_state(nnx.state(teacher, nnx.Param))}
  mine = {path_name(p): v for p, v in nnx.to_flat_state(nnx.state(student, nnx.Param))}
  kept = []
  for name, var in mine.items():
    src = re.sub(r"(^|\.)layers\.(\d+)\.", lambda m: f"{m[1]}layers.{2 * int(m[2])}.", name)
    if src not in theirs:
      kept.append(name)
      continue
    have, want = theirs[src].get_value().shape, var.get_value().shape
    if tuple(have) != tuple(want):
      raise ConfigError(f"distill.init_from_teacher_layers: teacher tensor {src!r} has shape "
                        f"{tuple(have)}, the student's {name!r} {tuple(want)}")
    # A copy: the student's buffers are donated to the train step, the teacher's are not.
    var.set_value(jnp.array(theirs[src].get_value(), var.get_value().dtype, copy=True))
  if kept:
    log(f"distill: not in the teacher {source} (left as initialized): {', '.join(kept)}")
  return {"kept": kept}


# ---- the task ------------------------------------------------------------------------------
@register
class Distill(Task):
  name = "distill"
  model_kind = "a decoder-only model or an encoder with an MLM head"
  architectures = KINDS["causal"] + MLM_ARCHITECTURES

  def __init__(self, kind: str = "causal", teacher: str = "", temperature: float = 2.0,
               alpha_kl: float = 1.0, alpha_hard: float = 1.0, alpha_cos: float = 0.0,
               init_layers: bool = False):
    self.kind, self.teacher = kind, teacher
    self.temperature, self.alpha_kl = temperature, alpha_kl
    self.alpha_hard, self.alpha_cos, self.init_layers = alpha_hard, alpha_cos, init_layers
    # The student's own objective: its data, hard labels, metrics and report.
    self.inner: Task = CausalLM() if kind == "causal" else MLM()
    self.prefix = "lm" if kind == "causal" else "mlm"

  def bind(self, cfg) -> Distill:
    d = cfg.distill
    return Distill(_student_kind(cfg), d.teacher, float(d.temperature), float(d.alpha_kl),
                   float(d.alpha_hard), float(d.alpha_cos), bool(d.init_from_teacher_layers))

  # ---- config -----------------------------------------------------------------------
  def check_model(self, model: ModelConfig, source: str) -> None:
    super().check_model(model, source)
    arch = (model.architectures or ["BertForPreTraining"])[0]
    if arch in KINDS["causal"] and not model.causal:
      raise ConfigError("train.objective='distill' with a decoder needs model.causal=True")

  def validate(self, cfg) -> None:
    d = cfg.distill
    if not d.teacher:
      raise ConfigError("distill.teacher: name the teacher (a jaxlm workdir or export, or a "
                        "Hugging Face model directory)")
    teacher_dir = resolve_dir(d.teacher)
    if not os.path.isdir(teacher_dir):
      raise ConfigError(f"distill.teacher: no such directory: {d.teacher!r}")
    if not os.path.isfile(os.path.join(teacher_dir, "config.json")):
      raise ConfigError(f"distill.teacher: {teacher_dir} has no config.json")
    if d.alpha_kl == 0 and d.alpha_cos == 0:
      raise ConfigError("distill.alpha_kl and distill.alpha_cos are both 0: nothing is learned "
                        "from the teacher (train.objective='causal' or 'mlm' trains alone)")
    teacher = _teacher_config(d.teacher)
    t_arch = teacher.architectures[0]
    if t_arch not in KINDS[self.kind]:
      raise ConfigError(f"distill.teacher: {teacher_dir} is a {t_arch}, but the student is "
                        f"{KIND_WORDS[self.kind]}; the teacher must be one too "
                        f"({_join(KINDS[self.kind])})")
    student = _student_config(cfg)
    self._check_tokenizers(cfg, teacher_dir)
    s_vocab = student.vocab_size if cfg.model.init_from else cfg.model.vocab_size
    if (cfg.model.init_from or s_vocab != _DEFAULT_VOCAB) and s_vocab != teacher.vocab_size:
      where = f"model.init_from={cfg.model.init_from}" if cfg.model.init_from else "model"
      raise ConfigError(f"model.vocab_size: the student ({where}) has {s_vocab} tokens, the "
                        f"teacher {teacher_dir} {teacher.vocab_size}; they must share one "
                        "tokenizer")
    if d.alpha_cos > 0 and student.hidden_size != teacher.hidden_size:
      raise ConfigError(f"distill.alpha_cos: the cosine loss compares hidden states, but the "
                        f"student's hidden_size is {student.hidden_size} and the teacher's "
                        f"{teacher.hidden_size}")
    if d.init_from_teacher_layers:
      _check_layer_init(cfg, student, teacher, teacher_dir)
    if cfg.data.max_seq_len > teacher.max_position_embeddings:
      raise ConfigError(f"data.max_seq_len ({cfg.data.max_seq_len}) exceeds "
                        f"max_position_embeddings of distill.teacher={d.teacher} "
                        f"({teacher.max_position_embeddings})")
    self.inner.validate(cfg)

  def _check_tokenizers(self, cfg, teacher_dir: str) -> None:
    """The student's tokenizer (model.init_from's or tokenizer.path, when given) must be
    the teacher's: same kind, same tokens at the same ids."""
    teacher_tok = _load_tokenizer(teacher_dir, "distill.teacher")
    if cfg.model.init_from:
      key, path = "model.init_from", resolve_dir(cfg.model.init_from)
    elif cfg.tokenizer.path:
      key, path = "tokenizer.path", cfg.tokenizer.path
    else:
      return  # the data will use the teacher's
    diff = tokenizer_difference(_load_tokenizer(path, key), teacher_tok)
    if diff:
      raise ConfigError(f"{key}: the student's tokenizer ({path}) differs from the teacher's "
                        f"({teacher_dir}): {diff}; distillation needs one tokenizer")

  def tokenizer_dir(self, cfg) -> str:
    """The teacher's tokenizer, unless the student brings its own (checked equal)."""
    return "" if cfg.model.init_from or cfg.tokenizer.path else resolve_dir(self.teacher)

  def model_ids(self, tokenizer, data_cfg) -> dict[str, Any]:
    return {**self.inner.model_ids(tokenizer, data_cfg),
            "vocab_size": _teacher_config(self.teacher).vocab_size}

  # ---- the trained model ---------------------------------------------------------------
  def training_model(self, model, cfg, log) -> Distiller:
    """The student with the teacher loaded beside it (in the student's runtime)."""
    teacher_dir = resolve_dir(self.teacher)
    teacher = from_pretrained(teacher_dir, runtime=model.runtime)
    if teacher.config.vocab_size != model.config.vocab_size:
      raise ConfigError(f"distill.teacher: {teacher_dir} has vocab_size "
                        f"{teacher.config.vocab_size}, the student {model.config.vocab_size}")
    if self.init_layers:
      init_from_teacher_layers(model, teacher, teacher_dir, log)
    log(f"distill: teacher {teacher_dir} ({_count(teacher):,} parameters, "
        f"{teacher.config.num_hidden_layers} layers, frozen); student {_count(model):,} "
        f"parameters, {model.config.num_hidden_layers} layers"
        + (", from teacher layers " + ", ".join(
            str(2 * i) for i in range(model.config.num_hidden_layers))
           if self.init_layers else ""))
    return Distiller(model, teacher)

  def trainable(self, model):
    return lambda path, value: isinstance(value, nnx.Param) and path[0] == "student"

  def exported_model(self, model):
    return model.student

  # ---- data ---------------------------------------------------------------------------
  def examples(self, corpus, split, data_cfg, seed):
    return self.inner.examples(corpus, split, data_cfg, seed)

  def vocab_positions_fraction(self, data_cfg) -> float:
    return self.inner.vocab_positions_fraction(data_cfg)

  # ---- the step -------------------------------------------------------------------------
  def forward(self, model, batch, rngs=None):
    if self.kind == "causal":
      return model(batch["input_ids"], batch["attention_mask"],
                   segment_ids=batch["segment_ids"], position_ids=batch["position_ids"],
                   project_logits=False, rngs=rngs)
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                 masked_positions=batch["masked_positions"], project_logits=False, rngs=rngs)

  def scored_weights(self, batch):
    """[B, P] weights of the positions the hard loss and the KL score."""
    key = "loss_weights" if self.kind == "causal" else "masked_weights"
    return batch[key] * example_weights(batch)[:, None]

  def stats(self, model, batch, rngs=None):
    student, teacher = model.student, model.teacher
    s_out = self.forward(student, batch, rngs)
    t_out = jax.lax.stop_gradient(self.forward(teacher, batch))  # never differentiated
    if self.kind == "causal":
      out = self.inner.lm_stats(student, s_out, batch)
    else:
      out = {**base.router_stats(student, s_out), **self.inner.mlm_stats(s_out, batch)}
    out["kd_kl_sum"] = kl_sum(s_out.projection, t_out.projection, self.scored_weights(batch),
                              self.temperature)
    if self.alpha_cos > 0:
      w_BT = batch["attention_mask"] * example_weights(batch)[:, None]
      out["kd_cos_sum"] = cosine_sum(s_out.last_hidden_state, t_out.last_hidden_state, w_BT)
      out["kd_cos_count"] = w_BT.sum()
    return out

  def counts(self, batch):
    out = self.inner.counts(batch)
    if self.alpha_cos > 0:
      out["kd_cos_count"] = (batch["attention_mask"] * example_weights(batch)[:, None]).sum()
    return out

  def loss(self, stats):
    n = jnp.maximum(stats[f"{self.prefix}_count"], 1.0)
    total = (self.alpha_hard * mean_loss(stats, self.prefix)
             + self.alpha_kl * self.temperature ** 2 * stats["kd_kl_sum"] / n)
    if self.alpha_cos > 0:
      total = total + self.alpha_cos * stats["kd_cos_sum"] / jnp.maximum(
          stats["kd_cos_count"], 1.0)
    return total

  # ---- metrics and report -----------------------------------------------------------------
  def _kd_metrics(self, m) -> dict[str, float]:
    n = max(float(m[f"{self.prefix}_count"]), 1.0)
    out = {"hard_loss": float(m[f"{self.prefix}_loss_sum"]) / n,
           "kl": float(m["kd_kl_sum"]) / n}
    if "kd_cos_sum" in m:
      out["cosine_loss"] = float(m["kd_cos_sum"]) / max(float(m["kd_cos_count"]), 1.0)
    return out

  def train_metrics(self, m):
    return {**self.inner.train_metrics(m), **self._kd_metrics(m)}

  def eval_metrics(self, sums, unigram_nll):
    out = self.inner.eval_metrics(sums, unigram_nll)
    return {**out, **{k: v for k, v in self._kd_metrics(sums).items() if k != "hard_loss"}}

  def unigram_log_probs(self, corpus, vocab_size):
    return self.inner.unigram_log_probs(corpus, vocab_size)

  def unigram_targets(self, batch):
    return self.inner.unigram_targets(batch)

  def samples(self, model, corpus, evaluator, cfg):
    return self.inner.samples(model.student, corpus, evaluator, cfg)

  def report_lines(self, rep):
    lines = [(f"distilled from {self.teacher}: val KL(teacher || student) at T="
              f"{self.temperature:g} {fmt(rep, 'val_kl')}, test {fmt(rep, 'test_kl')}")]
    if "val_cosine_loss" in rep:
      lines.append(f"  hidden-state cosine loss: val {fmt(rep, 'val_cosine_loss')}")
    return self.inner.report_lines(rep) + lines


# ---- helpers -------------------------------------------------------------------------------
def _student_kind(cfg) -> str:
  """causal or mlm, from the student's architecture (model.init_from's, when set)."""
  archs = list(cfg.model.architectures or [])
  if cfg.model.init_from:
    try:
      archs = load_config(resolve_dir(cfg.model.init_from))[0].architectures or archs
    except (JaxlmError, OSError, ValueError):
      pass  # validate() names the problem
  return "causal" if archs and archs[0] in KINDS["causal"] else "mlm"


def _teacher_config(path: str) -> ModelConfig:
  try:
    return load_config(resolve_dir(path))[0]
  except JaxlmError as e:
    raise ConfigError(f"distill.teacher: {e}") from None


def _student_config(cfg) -> ModelConfig:
  """The student's architecture: model.init_from's config, or the model section's."""
  if cfg.model.init_from:
    return load_config(resolve_dir(cfg.model.init_from))[0]
  fields = set(ModelConfig.__dataclass_fields__)
  return ModelConfig.from_dict({k: v for k, v in cfg.model.to_dict().items() if k in fields})


def _check_layer_init(cfg, student: ModelConfig, teacher: ModelConfig, teacher_dir: str):
  if cfg.model.init_from:
    raise ConfigError("distill.init_from_teacher_layers: the student already starts from "
                      f"model.init_from={cfg.model.init_from}; set one of them")
  n, have = student.num_hidden_layers, teacher.num_hidden_layers
  if 2 * (n - 1) >= have:
    raise ConfigError(f"distill.init_from_teacher_layers: a {n}-layer student takes teacher "
                      f"layers {', '.join(str(2 * i) for i in range(n))}, but {teacher_dir} "
                      f"has {have}")
  for key in LAYER_SHAPE_KEYS:
    mine, theirs = getattr(student, key), getattr(teacher, key)
    if mine != theirs:
      raise ConfigError(f"distill.init_from_teacher_layers: model.{key} is {mine!r}, the "
                        f"teacher's {theirs!r}; a student built from teacher layers has "
                        "their shapes")


def _load_tokenizer(path: str, key: str) -> Tokenizer:
  try:
    return Tokenizer.load(path)
  except JaxlmError as e:
    raise ConfigError(f"{key}: {e}") from None


def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str:
  """"" if the two tokenizers map the same tokens to the same ids, else the first
  difference in words."""
  if a.vocab_size != b.vocab_size:
    return f"vocab sizes {a.vocab_size} and {b.vocab_size}"
  if a.kind != b.kind:
    return f"kinds {a.kind} and {b.kind}"
  tokens_a = np.asarray([a.id_to_token(i) for i in range(a.vocab_size)], object)
  tokens_b = np.asarray([b.id_to_token(i) for i in range(b.vocab_size)], object)
  differ = np.flatnonzero(tokens_a != tokens_b)
  if differ.size:
    i = int(differ[0])
    return f"id {i} is {tokens_a[i]!r} in one and {tokens_b[i]!r} in the other"
  return ""


def _count(model) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _join(names) -> str:
  return ", ".join(sorted(names))
