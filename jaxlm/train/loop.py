"""The pretraining job: prepare data, build the model (or load `model.init_from`), train
with periodic evaluation and checkpoints, resume automatically, and finish with a test
evaluation and a report. BERT objectives (mlm, nsp, mlm+nsp), causal LM and T5 span
corruption share it."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from jaxlm import analysis, experiment
from jaxlm.data import pipeline
from jaxlm.data.corpus import MANIFEST, Corpus, prepare_corpus
from jaxlm.data.objectives import SPAN, vocab_positions_fraction
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError, DataError, JaxlmError
from jaxlm.models import auto
from jaxlm.parallel import distributed
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.rules import (activation_sharding, create_sharded, like_params_shardings,
                                  logical_to_spec, shard_module, state_shardings)
from jaxlm.train import report as report_lib
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.metrics import MetricsWriter
from jaxlm.train.optim import make_optimizer
from jaxlm.train.steps import make_eval_step, make_train_step


_KILL_AT_STEP = int(os.environ.get("JAXLM_KILL_AT_STEP", "0"))


def log(msg: str) -> None:
  if jax.process_index() == 0:  # multi-host: one copy of the progress lines, not one a host
    print(msg, file=sys.stderr, flush=True)


class Evaluator:
  """Fixed eval batches per split (built once) and the metrics we report on them.

  Each objective is compared with a unigram model of the same tokenizer on the same
  targets (masked tokens for MLM, next tokens for causal LM).
  """

  def __init__(self, corpus: Corpus, cfg, graphdef, vocab_size: int | None = None,
               batch_sharding=None):
    self.corpus, self.cfg = corpus, cfg
    self.batch_sharding = batch_sharding
    # Causal LM and span corruption both predict `targets` where `loss_weights` is 1.
    self.causal = cfg.train.objective in ("causal", SPAN)
    self.eval_step = make_eval_step(graphdef, cfg.train.objective)
    self.unigram_logp = (pipeline.causal_unigram_log_probs(corpus, vocab_size) if self.causal
                         else corpus.unigram_log_probs())
    self._batches: dict[str, list] = {}
    self._ready: dict[str, tuple[list, float]] = {}

  def batches(self, split: str) -> list:
    if split not in self._batches:
      self._batches[split] = list(pipeline.eval_batches(
          self.corpus, split, self.cfg.data, objective=self.cfg.train.objective,
          batch_size=self.cfg.eval.batch_size, seed=self.cfg.seed + 1,
          max_batches=self.cfg.eval.max_batches or None))
    return self._batches[split]

  def _prepared(self, split: str) -> tuple[list, float]:
    """(the split's batches on the mesh, the unigram model's NLL sum on their targets):
    both fixed for the run, so placed and summed once, not at every evaluation."""
    if split not in self._ready:
      placed, uni_sum = [], 0.0
      for batch in self.batches(split):
        on_device = batch
        if self.batch_sharding is not None:
          first, n = distributed.local_rows(self.batch_sharding, len(batch["example_weight"]))
          on_device = distributed.put_batch({k: v[first:first + n] for k, v in batch.items()},
                                            self.batch_sharding)
        placed.append(on_device)
        labels, w = ((batch["targets"], batch["loss_weights"]) if self.causal
                     else (batch["masked_ids"], batch["masked_weights"]))
        w = w * batch["example_weight"][:, None]
        uni_sum -= float((self.unigram_logp[labels] * w).sum())
      self._ready[split] = (placed, uni_sum)
    return self._ready[split]

  def __call__(self, params, split: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    placed, uni_sum = self._prepared(split)
    for on_device in placed:
      for k, v in jax.device_get(self.eval_step(params, on_device)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    if self.causal:
      n = max(sums["lm_count"], 1.0)
      loss = sums["lm_loss_sum"] / n
      return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
              "accuracy": sums["lm_correct"] / n, "unigram_perplexity": math.exp(uni_sum / n)}
    mlm_n, nsp_n = max(sums["mlm_count"], 1.0), max(sums["nsp_count"], 1.0)
    mlm_loss, nsp_loss = sums["mlm_loss_sum"] / mlm_n, sums["nsp_loss_sum"] / nsp_n
    out = {"loss": mlm_loss + nsp_loss, "nsp_loss": nsp_loss,
           "nsp_accuracy": sums["nsp_correct"] / nsp_n}
    if sums["mlm_count"]:
      out.update(mlm_loss=mlm_loss, mlm_perplexity=math.exp(min(mlm_loss, 50.0)),
                 mlm_accuracy=sums["mlm_correct"] / mlm_n,
                 unigram_perplexity=math.exp(uni_sum / mlm_n))
    if not sums["nsp_count"]:
      del out["nsp_accuracy"], out["nsp_loss"]
    return out


def _router_metrics(m) -> dict[str, float]:
  """MoE balance: aux losses, and the fraction of routed token slots per expert (the mean
  over layers, plus the extremes over layers and experts)."""
  if "expert_fraction" not in m:
    return {}
  frac_LE = m["expert_fraction"]
  out = {"router_aux_loss": m["router_aux_loss"], "router_z_loss": m["router_z_loss"],
         "expert_fraction_min": frac_LE.min(), "expert_fraction_max": frac_LE.max()}
  out.update({f"expert_fraction_{e}": f for e, f in enumerate(frac_LE.mean(0))})
  return out


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
  return {f"{prefix}_{k}": v for k, v in metrics.items()}


def load_pretrained(cfg) -> tuple[nnx.Module, Tokenizer]:
  """model.init_from: the checkpoint's model (architecture and weights) and tokenizer.
  Only experiment.RUNTIME_MODEL_KEYS (dropout, compute dtype) may differ from it."""
  directory = cfg.model.init_from
  loaded = auto.from_pretrained(directory)
  model_cfg = experiment.pretrained_model_config(cfg, loaded.config)
  tok = Tokenizer.load(directory)
  if tok.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"model.init_from: the tokenizer in {directory} has {tok.vocab_size} "
                      f"tokens, more than the model's vocab_size {model_cfg.vocab_size}")
  if model_cfg == loaded.config:
    return loaded, tok
  # Same parameters in a module rebuilt with the runtime overrides.
  model = auto.build_abstract_model(model_cfg)
  nnx.update(model, nnx.state(loaded, nnx.Param))
  return model, tok


def batch_sharding(cfg, mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",), cfg.mesh.rules, mesh))


def setup(cfg, workdir: str, mesh=None):
  """Validates, prepares (or reuses) the corpus and builds (or loads) the model, its
  parameters created directly in their sharded layout on the mesh.

  Everything that can fail on user input runs before the corpus is written. Multi-host:
  the primary process prepares the corpus, the others then read it.
  """
  model_cfg = experiment.validate(cfg)
  mesh = make_mesh(cfg.mesh) if mesh is None else mesh
  rules = cfg.mesh.rules
  tok_cfg, model = cfg.tokenizer, None
  if cfg.model.init_from:
    model, _ = load_pretrained(cfg)
    tok_cfg = ml_collections.ConfigDict(cfg.tokenizer.to_dict())
    tok_cfg.path = os.path.abspath(cfg.model.init_from)
  data_dir = os.path.join(workdir, "data")
  primary, failed = distributed.is_primary(), None
  if primary:
    try:
      corpus = prepare_corpus(cfg.data, tok_cfg, data_dir, log=log)
    except JaxlmError as e:
      failed = e
  # A barrier that also stops every process with the primary's error (the others would
  # otherwise wait for it at the next collective until a timeout).
  if distributed.any_process(failed is not None):
    raise failed or DataError(f"data: the primary process failed to prepare the corpus in "
                              f"{data_dir}; see its error")
  if distributed.any_process(not os.path.exists(os.path.join(data_dir, MANIFEST))):
    raise ConfigError(f"--workdir {workdir}: not every process sees the corpus the primary "
                      "prepared there; give all hosts one shared directory")
  if not primary:
    corpus = prepare_corpus(cfg.data, tok_cfg, data_dir, log=lambda _: None)
  tok = corpus.tokenizer
  if model is None:
    ids = {"vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id}
    if cfg.train.objective == SPAN:
      ids = pipeline.span_model_ids(tok, cfg.data.num_sentinels)
    elif cfg.train.objective == "causal":
      eod = pipeline.end_of_document_id(tok)
      ids.update(eos_token_id=eod, pad_token_id=eod if tok.pad_id is None else tok.pad_id)
    model_cfg = model_cfg.replace(**ids)
    model = create_sharded(lambda: auto.build_model(model_cfg, seed=cfg.seed), mesh, rules)
  else:
    model = shard_module(model, mesh, rules)
  return corpus, model


def train(cfg, workdir: str) -> dict[str, Any]:
  """Trains on the mesh the config describes (all devices by default), resuming from the
  latest checkpoint in `workdir`; returns the report."""
  mesh = make_mesh(cfg.mesh)
  with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.rules):
    return _train(cfg, workdir, mesh)


def sharded_train_state(model, cfg, mesh):
  """(graphdef, params, tx, schedule, opt_state, (param, optimizer-state shardings)):
  Adam moments take their parameter's sharding (FSDP shards them too)."""
  graphdef, params = nnx.split(model, nnx.Param)
  tx, schedule = make_optimizer(cfg.train)
  p_sh = state_shardings(params, mesh, cfg.mesh.rules)
  o_sh = like_params_shardings(jax.eval_shape(tx.init, params), params, p_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
  return graphdef, params, tx, schedule, opt_state, (p_sh, o_sh)


def _train(cfg, workdir: str, mesh) -> dict[str, Any]:
  t_start = time.time()
  corpus, model = setup(cfg, workdir, mesh)
  primary = distributed.is_primary()
  if primary:
    with open(os.path.join(workdir, "experiment.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json(indent=2))
  graphdef, params, tx, schedule, opt_state, (p_sh, o_sh) = sharded_train_state(
      model, cfg, mesh)
  t = cfg.train
  on_mesh = batch_sharding(cfg, mesh)
  # Multi-host: each process reads only the rows of every batch that its devices hold.
  split = distributed.batch_split(on_mesh, t.batch_size)
  data_iter = pipeline.train_iterator(corpus, cfg.data, objective=t.objective,
                                      batch_size=t.batch_size, seed=cfg.seed,
                                      process_index=split.part, process_count=split.parts)
  run: dict[str, Any] = {"step": 0, "tokens_seen": 0, "best_val_loss": None, "bad_evals": 0,
                         "stopped_early": False, "train_seconds": 0.0}
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      max_to_keep=cfg.checkpoint.max_to_keep)
  latest = ckpt.latest_step()
  if latest is not None:
    (params, opt_state), run = ckpt.restore(latest, (params, opt_state))
    data_iter.set_state(run.pop("data_iter"))
    log(f"resuming from checkpoint at step {run['step']} in {workdir}")
  writer = MetricsWriter(workdir, resume_step=run["step"]) if primary else None
  mc = model.config
  train_step = make_train_step(
      graphdef, tx, seed=cfg.seed, objective=t.objective,
      dropout=mc.hidden_dropout_prob > 0 or mc.attention_probs_dropout_prob > 0,
      grad_accum_steps=t.grad_accum_steps, out_shardings=(p_sh, o_sh, None))
  evaluator = Evaluator(corpus, cfg, graphdef, mc.vocab_size, batch_sharding=on_mesh)
  head_fraction = vocab_positions_fraction(t.objective, cfg.data.max_seq_len,
                                           cfg.data.mask_prob)
  flops_per_token = analysis.training_flops_per_token(
      mc, cfg.data.max_seq_len, head_fraction)["total"]
  peak = analysis.job_peak_flops(mc.dtype)

  local_tokens = 0  # tokens of this process's rows, not yet in run["tokens_seen"]

  def count_tokens() -> None:
    """Adds all processes' new tokens to run["tokens_seen"]. A collective, so only at
    logging and checkpoint steps (the same on every process), never every step."""
    nonlocal local_tokens
    run["tokens_seen"] += distributed.process_sum(local_tokens)
    local_tokens = 0

  def save(step):
    count_tokens()
    ckpt.save(step, (params, opt_state), {**run, "data_iter": data_iter.get_state()})

  step = run["step"]
  bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
             disable=None if primary else True, file=sys.stderr)
  interval_t0, interval_start_tokens, interval_start_step = time.time(), run["tokens_seen"], step
  while step < t.steps and not run["stopped_early"]:
    batch = next(data_iter)
    if split.first_reader:  # replicas (processes fed the same rows) count them once
      local_tokens += int(batch["attention_mask"].sum())
    params, opt_state, m = train_step(params, opt_state, distributed.put_batch(batch, on_mesh),
                                      step)
    step += 1
    if step == _KILL_AT_STEP:  # fault injection for the resume tests: die with no cleanup
      os.kill(os.getpid(), signal.SIGKILL)
    if step % t.log_every == 0 or step == t.steps:
      m = jax.device_get(m)
      count_tokens()
      interval_tokens = run["tokens_seen"] - interval_start_tokens
      dt = time.time() - interval_t0
      run["train_seconds"] += dt
      row = {"loss": m["loss"], "learning_rate": schedule(step - 1),
             "tokens_per_s": interval_tokens / max(dt, 1e-9), "grad_norm": m["grad_norm"],
             "step_time_s": dt / max(step - interval_start_step, 1)}
      if "lm_count" in m:
        row["accuracy"] = m["lm_correct"] / max(m["lm_count"], 1)
      else:
        row.update(mlm_accuracy=m["mlm_correct"] / max(m["mlm_count"], 1),
                   nsp_accuracy=m["nsp_correct"] / max(m["nsp_count"], 1))
      row.update(_router_metrics(m))
      if peak is not None:  # model FLOPs utilization (MaxText's FLOPs accounting)
        row["mfu"] = row["tokens_per_s"] * flops_per_token / peak[0]
      if writer:
        writer.write(step, row)
      bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
      if bar.disable and primary:  # no terminal: a plain progress line instead of the bar
        eta = (t.steps - step) * dt / t.log_every
        log(f"step {step}/{t.steps} loss {row['loss']:.4f} tok/s {row['tokens_per_s']:.0f} "
            f"eta {eta:.0f}s")
      interval_t0, interval_start_tokens, interval_start_step = (
          time.time(), run["tokens_seen"], step)
    if step % t.eval_every == 0 or step == t.steps:
      val = evaluator(params, "validation")
      if writer:
        writer.write(step, _prefixed("val", val))
      log(f"step {step}: " + ", ".join(f"val_{k}={v:.4g}" for k, v in val.items()))
      if run["best_val_loss"] is None or val["loss"] < run["best_val_loss"]:
        run["best_val_loss"], run["bad_evals"] = val["loss"], 0
      else:
        run["bad_evals"] += 1
        if t.early_stopping_patience and run["bad_evals"] >= t.early_stopping_patience:
          run["stopped_early"] = True
          log(f"early stopping at step {step}: no val loss improvement in "
              f"{run['bad_evals']} evaluations")
      interval_t0, interval_start_step = time.time(), step  # evaluation is not training
    run["step"] = step
    if step % cfg.checkpoint.every == 0 or step == t.steps or run["stopped_early"]:
      save(step)
    bar.update(1)
  bar.close()
  if ckpt.latest_step() != step:
    save(step)
  ckpt.close()
  if writer:
    writer.close()
  # The model object moves to the host (gathered from every process): the export and the
  # report's samples use it; evaluation keeps the sharded params.
  nnx.update(model, distributed.fully_replicated_host(params))
  if primary:
    auto.save_pretrained(model, os.path.join(workdir, "model"))
    corpus.tokenizer.save(os.path.join(workdir, "model"))
  rep = finish(cfg, workdir, corpus, model, evaluator, params, run, time.time() - t_start)
  distributed.sync("report written")
  return rep


def finish(cfg, workdir, corpus, model, evaluator, params, run, wall) -> dict[str, Any]:
  """Final validation and test evaluation (every process), fill-mask examples (BERT) or
  greedy continuations (causal LM) and report.json (the primary process)."""
  val, test = evaluator(params, "validation"), evaluator(params, "test")
  rep = {
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "tokens_seen": int(run["tokens_seen"]),
      "steps": int(run["step"]),
      "stopped_early": bool(run["stopped_early"]),
      "wall_seconds": round(wall, 1),
      "train_seconds": round(run["train_seconds"], 1),
      **_prefixed("val", val), **_prefixed("test", test),
      "unigram_perplexity": val.get("unigram_perplexity"),
      "corpus": {k: v for k, v in corpus.manifest.items() if k != "settings"},
  }
  e = cfg.eval
  if not distributed.is_primary():
    return rep
  if cfg.train.objective == SPAN:
    rep["samples"] = report_lib.span_samples(
        model, corpus, evaluator.batches("test")[0], e.samples,
        pipeline.sentinel_ids(corpus.tokenizer, cfg.data.num_sentinels))
  elif cfg.train.objective == "causal":
    rep["samples"] = report_lib.continuation_samples(
        model, corpus, e.samples, eod=pipeline.end_of_document_id(corpus.tokenizer),
        prompt_tokens=e.sample_prompt_tokens,
        new_tokens=min(e.sample_new_tokens, cfg.data.max_seq_len - e.sample_prompt_tokens))
  else:
    rep["fill_mask"] = report_lib.fill_mask_examples(model, corpus, e.fill_mask_examples,
                                                     max_seq_len=cfg.data.max_seq_len)
  with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(rep, f, indent=2)
  print(report_lib.format_report(rep))
  return rep


def evaluate(cfg, workdir: str) -> dict[str, Any]:
  """--mode=eval: evaluate the latest checkpoint on validation and test."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ConfigError(f"--workdir {workdir}: no checkpoints to evaluate (train first)")
  mesh = make_mesh(cfg.mesh)
  with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.rules):
    corpus, model = setup(cfg, workdir, mesh)
    graphdef, params, _, _, opt_state, _ = sharded_train_state(model, cfg, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                        max_to_keep=cfg.checkpoint.max_to_keep)
    step = ckpt.latest_step()
    if step is None:
      raise ConfigError(f"--workdir {workdir}: no checkpoints to evaluate (train first)")
    (params, _), _ = ckpt.restore(step, (params, opt_state))
    ckpt.close()
    evaluator = Evaluator(corpus, cfg, graphdef, model.config.vocab_size,
                          batch_sharding=batch_sharding(cfg, mesh))
    out = {"step": int(step), **_prefixed("val", evaluator(params, "validation")),
           **_prefixed("test", evaluator(params, "test"))}
  if distributed.is_primary():
    with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
  return out

