"""The training job: prepare data, build the model (or load `model.init_from`), train
with periodic evaluation and checkpoints, resume automatically, and finish with a test
evaluation and a report. The objective is a task (jaxlm/tasks/), looked up once; the
loop itself knows no objective by name."""

from __future__ import annotations

import json
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
from jaxlm.data.corpus import MANIFEST, prepare_corpus
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError, DataError, JaxlmError
from jaxlm.models import auto
from jaxlm.parallel import distributed
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.rules import (activation_sharding, create_sharded, like_params_shardings,
                                  logical_to_spec, shard_module, state_shardings)
from jaxlm.peft import lora
from jaxlm.pretrained import from_pretrained, resolve_dir, save_pretrained
from jaxlm.train import report as report_lib
from jaxlm.train import finetune as finetuning
from jaxlm.train.checkpoint import Checkpointer, move_aside
from jaxlm.train.lock import LOCK_NAME, WorkdirLock
from jaxlm.train.evaluator import Evaluator
from jaxlm.train.metrics import MetricsWriter
from jaxlm.train.optim import make_optimizer
from jaxlm.train.steps import make_train_step


_KILL_AT_STEP = int(os.environ.get("JAXLM_KILL_AT_STEP", "0"))


def log(msg: str) -> None:
  if jax.process_index() == 0:  # multi-host: one copy of the progress lines, not one a host
    print(msg, file=sys.stderr, flush=True)


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
  """model.init_from: the checkpoint's model (architecture and weights) and tokenizer,
  running as the config says (experiment.runtime). Only experiment.RUNTIME_MODEL_KEYS
  (dropout, compute dtype, ...) may differ from the checkpoint, except when
  fine-tuning, where other keys reshape the model the weights are loaded into."""
  directory = resolve_dir(cfg.model.init_from)
  runtime = experiment.runtime(cfg)
  loaded = from_pretrained(directory, runtime=runtime)
  tuning = experiment.task_of(cfg).finetune
  model_cfg = experiment.pretrained_model_config(cfg, loaded.config, strict=not tuning)
  tok = Tokenizer.load(directory)
  if tok.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"model.init_from: the tokenizer in {directory} has {tok.vocab_size} "
                      f"tokens, more than the model's vocab_size {model_cfg.vocab_size}")
  if model_cfg == loaded.config:
    return loaded, tok
  # Same parameters in a module rebuilt with the config's overrides (dropout).
  model = auto.build_abstract_model(model_cfg, runtime=runtime)
  nnx.update(model, nnx.state(loaded, nnx.Param))
  return model, tok


def batch_sharding(cfg, mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",), cfg.mesh.rules, mesh))


def setup(cfg, workdir: str, mesh=None):
  """Validates, prepares (or reuses) the corpus and builds (or loads) the model, its
  parameters created directly in their sharded layout on the mesh; returns (corpus,
  model, task).

  Everything that can fail on user input runs before the corpus is written. Multi-host:
  the primary process prepares the corpus, the others then read it.
  """
  model_cfg = experiment.validate(cfg)
  task = experiment.task_of(cfg)
  mesh = make_mesh(cfg.mesh) if mesh is None else mesh
  rules = cfg.mesh.rules
  tok_cfg, model = cfg.tokenizer, None
  if task.finetune:  # labeled data, and the task's head on the model
    pretrained, _ = load_pretrained(cfg)
    data = task.prepare_data(cfg, None, os.path.join(workdir, "data"), log)
    model, _ = finetuning.build(cfg, task, data, pretrained, experiment.runtime(cfg),
                              cfg.model.init_from, log if distributed.is_primary() else _quiet)
    return data, shard_module(model, mesh, rules), task
  if cfg.model.init_from:
    model, _ = load_pretrained(cfg)
    tok_cfg = ml_collections.ConfigDict(cfg.tokenizer.to_dict())
    tok_cfg.path = os.path.abspath(resolve_dir(cfg.model.init_from))
  elif task.tokenizer_dir(cfg):  # e.g. distillation: the teacher's tokenizer
    tok_cfg = ml_collections.ConfigDict(cfg.tokenizer.to_dict())
    tok_cfg.path = os.path.abspath(task.tokenizer_dir(cfg))
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
  if model is None:
    model_cfg = model_cfg.replace(**task.model_ids(corpus.tokenizer, cfg.data))
    rt = experiment.runtime(cfg)
    model = create_sharded(lambda: auto.build_model(model_cfg, runtime=rt, seed=cfg.seed),
                           mesh, rules)
  model = task.training_model(model, cfg, log if primary else _quiet)
  return corpus, shard_module(model, mesh, rules), task


def _quiet(_msg: str) -> None:
  pass


class Preempted(JaxlmError):
  """SIGTERM/SIGINT: the run saved a checkpoint at the current step and stopped."""

  def __init__(self, msg: str, signum: int):
    super().__init__(msg)
    self.signum = signum


class NonFinite(JaxlmError):
  """The loss or gradient norm stopped being finite (train.nan_policy)."""


def train(cfg, workdir: str, *, fresh: bool = False) -> dict[str, Any]:
  """Trains on the mesh the config describes (all devices by default), resuming from the
  latest checkpoint in `workdir`; returns the report. The run holds the workdir's lock
  (train/lock.py) throughout; `fresh` moves existing checkpoints aside first."""
  experiment.validate(cfg)  # bad input fails before the workdir is touched
  created = not os.path.exists(workdir)
  lock, failed = None, None
  if distributed.is_primary():
    try:
      lock = WorkdirLock(workdir).acquire()
    except JaxlmError as e:
      failed = e
  if distributed.any_process(failed is not None):  # the others wait for the primary's lock
    raise failed or ConfigError(f"--workdir {workdir}: the primary process could not lock it")
  try:
    if fresh and distributed.is_primary():
      moved = move_aside(os.path.join(workdir, "checkpoints"))
      if moved:
        log(f"--fresh: moved the old checkpoints to {moved}")
    distributed.sync("workdir ready")
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.rules):
      return _Trainer(cfg, workdir, mesh).run()
  except JaxlmError:
    # A workdir this run created and then failed in before writing anything (bad data):
    # leave no trace of it.
    if lock is not None and created and os.listdir(workdir) == [LOCK_NAME]:
      lock.release()
      lock = None
      os.remove(os.path.join(workdir, LOCK_NAME))
      os.rmdir(workdir)
    raise
  finally:
    if lock is not None:
      lock.release()


def finetune(cfg, workdir: str, *, fresh: bool = False) -> dict[str, Any]:
  """--mode=finetune: `train` with a fine-tuning objective (tasks/finetune_base.py)."""
  if not experiment.task_of(cfg).finetune:
    raise ConfigError(f"--mode=finetune: train.objective={cfg.train.objective!r} is not a "
                      "fine-tuning task (classify, token_classify, extractive_qa, sft)")
  return train(cfg, workdir, fresh=fresh)


def sharded_train_state(model, cfg, mesh):
  """(graphdef, params, frozen, tx, schedule, opt_state, (param, optimizer-state
  shardings)): Adam moments take their parameter's sharding (FSDP shards them too).
  `frozen` is None unless fine-tuning trains part of the model (freezing, LoRA): then
  `params` is that part, the only one with gradients and optimizer state."""
  if experiment.task_of(cfg).finetune:
    graphdef, params, frozen = finetuning.split(model, finetuning.trainable(cfg, model))
    tx, schedule = finetuning.make_optimizer(cfg.train, cfg.finetune, params)
  elif (filt := experiment.task_of(cfg).trainable(model)) is not None:
    graphdef, params, frozen = finetuning.split(model, filt)
    tx, schedule = make_optimizer(cfg.train)
  else:
    (graphdef, params), frozen = nnx.split(model, nnx.Param), None
    tx, schedule = make_optimizer(cfg.train)
  p_sh = state_shardings(params, mesh, cfg.mesh.rules)
  o_sh = like_params_shardings(jax.eval_shape(tx.init, params), params, p_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
  return graphdef, params, frozen, tx, schedule, opt_state, (p_sh, o_sh)


class _Trainer:
  """One training run: `__init__` builds everything and restores the latest checkpoint;
  `run` loops over the steps `_log`, `_evaluate` and `_save`, then `_export`s the model
  and `_finish`es with the test evaluation and report."""

  def __init__(self, cfg, workdir: str, mesh):
    self.t_start = time.time()
    self.cfg, self.workdir, self.t = cfg, workdir, cfg.train
    self.corpus, self.model, self.task = setup(cfg, workdir, mesh)
    self.primary = distributed.is_primary()
    if self.primary:
      with open(os.path.join(workdir, "experiment.json"), "w", encoding="utf-8") as f:
        f.write(cfg.to_json(indent=2))
    (self.graphdef, self.params, self.frozen, tx, self.schedule, self.opt_state,
     (p_sh, o_sh)) = sharded_train_state(self.model, cfg, mesh)
    self.on_mesh = batch_sharding(cfg, mesh)
    # Multi-host: each process reads only the rows of every batch that its devices hold.
    self.split = distributed.batch_split(self.on_mesh, self.t.batch_size)
    self.data_iter = self.task.train_iterator(
        self.corpus, cfg.data, batch_size=self.t.batch_size, seed=cfg.seed,
        process_index=self.split.part, process_count=self.split.parts)
    self.run_state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "best_val_loss": None,
                                      "bad_evals": 0, "stopped_early": False,
                                      "train_seconds": 0.0, "best_metric": None,
                                      "best_step": None}
    self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                             max_to_keep=cfg.checkpoint.max_to_keep)
    # train.keep_best: the parameters of the best evaluation so far (early-stopping metric).
    self.best = (Checkpointer(os.path.join(workdir, "best"), max_to_keep=1)
                 if self.t.keep_best else None)
    self._restore()
    self.writer = (MetricsWriter(workdir, resume_step=self.run_state["step"])
                   if self.primary else None)
    mc, rt = self.model.config, self.model.runtime
    self.train_step = make_train_step(
        self.graphdef, tx, self.task, seed=cfg.seed,
        dropout=mc.hidden_dropout_prob > 0 or mc.attention_probs_dropout_prob > 0,
        grad_accum_steps=self.t.grad_accum_steps, out_shardings=(p_sh, o_sh, None))
    self.evaluator = Evaluator(self.corpus, cfg, self.graphdef, self.task, mc.vocab_size,
                               batch_sharding=self.on_mesh)
    self.flops_per_token = analysis.training_flops_per_token(
        mc, cfg.data.max_seq_len, self.task.vocab_positions_fraction(cfg.data))["total"]
    self.peak = analysis.job_peak_flops(rt.dtype)
    self.peak_rechecked = False
    self.local_tokens = 0  # tokens of this process's rows, not yet in tokens_seen

  def _restore(self) -> None:
    found = self.ckpt.restore_latest((self.params, self.opt_state), log)
    if found is not None:
      (self.params, self.opt_state), restored, _ = found
      self.run_state.update(restored)
      self.data_iter.set_state(self.run_state.pop("data_iter"))
      log(f"resuming from checkpoint at step {self.run_state['step']} in {self.workdir}")

  def _count_tokens(self) -> None:
    """Adds all processes' new tokens to tokens_seen. A collective, so only at logging
    and checkpoint steps (the same on every process), never every step."""
    self.run_state["tokens_seen"] += distributed.process_sum(self.local_tokens)
    self.local_tokens = 0

  def _check_finite(self, step: int, m) -> None:
    """train.nan_policy on the guard's counters (optim.SkipNonFinite): `stop` at the
    first non-finite step, `skip` after train.max_skipped_steps of them in a row. The
    guard never applied them, so every checkpoint holds a finite state."""
    if "skipped_steps" not in m:
      return
    total, in_a_row, first = (int(x) for x in jax.device_get(
        (m["skipped_steps"], m["skipped_in_a_row"], m["first_skipped_step"])))
    t = self.t
    if t.nan_policy == "stop" and total:
      raise NonFinite(f"step {first + 1}: the loss or gradient norm is not finite; stopped "
                      f"(train.nan_policy=stop). The last checkpoint, step "
                      f"{self.ckpt.latest_step()}, holds the last good state")
    if t.nan_policy == "skip" and in_a_row >= t.max_skipped_steps:
      raise NonFinite(f"step {step}: {in_a_row} non-finite steps in a row (skipped; "
                      f"train.max_skipped_steps={t.max_skipped_steps}); stopped")

  def _save(self, step: int) -> None:
    self._count_tokens()
    self.ckpt.save(step, (self.params, self.opt_state),
                   {**self.run_state, "data_iter": self.data_iter.get_state()})

  def _start_interval(self, step: int) -> None:
    self.interval = (time.time(), self.run_state["tokens_seen"], step)

  def _log(self, step: int, m, bar) -> None:
    """A metrics.jsonl row: loss, learning rate, speed, the task's and MoE metrics."""
    m = jax.device_get(m)
    self._count_tokens()
    t0, tokens0, step0 = self.interval
    dt = time.time() - t0
    self.run_state["train_seconds"] += dt
    row = {"loss": m["loss"], "learning_rate": self.schedule(step - 1),
           "tokens_per_s": (self.run_state["tokens_seen"] - tokens0) / max(dt, 1e-9),
           "grad_norm": m["grad_norm"], "step_time_s": dt / max(step - step0, 1)}
    row.update(self.task.train_metrics(m))
    if "skipped_steps" in m:  # non-finite steps the guard never applied (train.nan_policy)
      row["skipped_steps"] = m["skipped_steps"]
    row.update(_router_metrics(m))
    if self.peak is not None:  # model FLOPs utilization (MaxText's FLOPs accounting)
      row["mfu"] = self._mfu(row["tokens_per_s"])
    if self.writer:
      self.writer.write(step, row)
    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
    if bar.disable and self.primary:  # no terminal: a plain progress line instead of the bar
      eta = (self.t.steps - step) * dt / self.t.log_every
      log(f"step {step}/{self.t.steps} loss {row['loss']:.4f} tok/s "
          f"{row['tokens_per_s']:.0f} eta {eta:.0f}s")
    self._start_interval(step)

  def _mfu(self, tokens_per_s: float) -> float:
    """tokens/s x FLOPs per token / the job's peak. A CPU's peak is measured: an MFU
    above 1 proves that measurement read low, so it is taken again once (a peak is the
    best the machine does, so the higher one stands)."""
    mfu = tokens_per_s * self.flops_per_token / self.peak[0]
    if mfu > 1.0 and self.peak[1] == "measured" and not self.peak_rechecked:
      self.peak_rechecked = True
      fresh = analysis.measure_cpu()
      analysis.remember_cpu_peak(fresh)  # the cache keeps the higher of the readings
      key = "peak_flops_f32" if self.model.runtime.dtype == "float32" else "peak_flops"
      self.peak = (max(self.peak[0], fresh[key] * jax.process_count()), "measured")
      mfu = tokens_per_s * self.flops_per_token / self.peak[0]
      if mfu > 1.0:
        log(f"warning: MFU {mfu:.2f} > 1 with the peak measured twice; the FLOPs count or "
            "the peak is off")
    return mfu

  def eval_params(self):
    """What the evaluator reads: the parameters, with the frozen part when there is one."""
    return self.params if self.frozen is None else (self.params, self.frozen)

  def _evaluate(self, step: int) -> None:
    """Validation metrics; early stopping and train.keep_best on the chosen metric
    (train.early_stopping_metric: lower is better for loss and perplexity, higher for
    the rest)."""
    run = self.run_state
    val = self.evaluator(self.eval_params(), "validation")
    scalars = _scalars(val)
    if self.writer:
      self.writer.write(step, _prefixed("val", scalars))
    log(f"step {step}: " + ", ".join(f"val_{k}={v:.4g}" for k, v in scalars.items()))
    if run["best_val_loss"] is None or val["loss"] < run["best_val_loss"]:
      run["best_val_loss"] = val["loss"]
    key = self.t.early_stopping_metric
    if key not in scalars:
      raise ConfigError(f"train.early_stopping_metric={key!r} is not a validation metric of "
                        f"train.objective={self.t.objective!r}; have {sorted(scalars)}")
    value, best = scalars[key], run.get("best_metric")
    lower = key in ("loss", "perplexity") or key.endswith("_loss")
    if best is None or (value < best if lower else value > best):
      run["best_metric"], run["best_step"], run["bad_evals"] = value, step, 0
      if self.best is not None:
        self.best.save(step, (self.params, self.opt_state), {"step": step, key: value})
    else:
      run["bad_evals"] += 1
      patience = self.t.early_stopping_patience
      if patience and run["bad_evals"] >= patience:
        run["stopped_early"] = True
        log(f"early stopping at step {step}: no val {key} improvement in "
            f"{run['bad_evals']} evaluations")
    # Evaluation is not training: its time leaves the interval (its tokens stay).
    self.interval = (time.time(), self.interval[1], step)

  def _on_signal(self, signum, _frame) -> None:
    self.stop_signal = signum  # acted on at the end of the current step

  def _preempted(self) -> bool:
    """Whether a SIGTERM/SIGINT arrived (on any process: they stop at the same step)."""
    got = self.stop_signal is not None
    return distributed.any_process(got) if jax.process_count() > 1 else got

  def run(self) -> dict[str, Any]:
    self.stop_signal = None
    handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      return self._run()
    finally:
      for s, h in handlers.items():
        signal.signal(s, h)

  def _run(self) -> dict[str, Any]:
    t, run = self.t, self.run_state
    step = run["step"]
    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if self.primary else True, file=sys.stderr)
    self._start_interval(step)
    while step < t.steps and not run["stopped_early"]:
      batch = next(self.data_iter)
      if self.split.first_reader:  # replicas (processes fed the same rows) count them once
        self.local_tokens += int(batch["attention_mask"].sum())
      self.params, self.opt_state, m = self.train_step(
          self.params, self.opt_state, distributed.put_batch(batch, self.on_mesh), step,
          *(() if self.frozen is None else (self.frozen,)))
      step += 1
      if step == _KILL_AT_STEP:  # fault injection for the resume tests: die with no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
      if step % t.log_every == 0 or step == t.steps:
        self._log(step, m, bar)
        self._check_finite(step, m)
      if step % t.eval_every == 0 or step == t.steps:
        self._evaluate(step)
      run["step"] = step
      preempted = self._preempted()
      if (step % self.cfg.checkpoint.every == 0 or step == t.steps or run["stopped_early"]
          or preempted):
        self._check_finite(step, m)  # never checkpoint past a non-finite step under `stop`
        self._save(step)
      bar.update(1)
      if preempted:
        bar.close()
        self._close()
        name = signal.Signals(self.stop_signal or signal.SIGTERM).name
        raise Preempted(f"{name} at step {step}: checkpoint saved, metrics flushed; rerun the "
                        "same command to resume", self.stop_signal or signal.SIGTERM)
    bar.close()
    if self.ckpt.latest_step() != step:
      self._save(step)
    self._restore_best()
    self._close()
    self._export()
    rep = self._finish(time.time() - self.t_start)
    distributed.sync("report written")
    return rep

  def _close(self) -> None:
    self.ckpt.close()
    if self.best is not None:
      self.best.close()
    if self.writer:
      self.writer.close()

  def _restore_best(self) -> None:
    """train.keep_best: the run ends with the best evaluation's parameters."""
    if self.best is None:
      return
    found = self.best.restore_latest((self.params, self.opt_state), log)
    if found is not None:
      (self.params, _), _, step = found
      log(f"train.keep_best: the model is the one of step {step} "
          f"(val {self.t.early_stopping_metric} {self.run_state.get('best_metric'):.4g})")

  def _export(self) -> None:
    """The model object moves to the host (gathered from every process) and is saved
    with its tokenizer to workdir/model; evaluation keeps the sharded params."""
    nnx.update(self.model, distributed.fully_replicated_host(self.params))
    if self.primary:
      out = os.path.join(self.workdir, "model")
      try:
        if self.cfg.finetune.lora.rank:  # the adapters on their own, then merged for export
          lora.save_adapters(self.model, os.path.join(self.workdir, "adapters"),
                             finetuning.lora_config(self.cfg, self.model))
          lora.merge_lora(self.model)
        save_pretrained(self.task.exported_model(self.model), out)
        self.corpus.tokenizer.save(out)
      except OSError as e:
        raise DataError(f"cannot write the exported model to {out}: {e.strerror or e}") from None

  def _finish(self, wall: float) -> dict[str, Any]:
    """Final validation and test evaluation (every process); the task's samples and
    report.json (the primary process)."""
    run, corpus = self.run_state, self.corpus
    val = self.evaluator(self.eval_params(), "validation")
    test = self.evaluator(self.eval_params(), "test")
    rep = {
        "params": int(sum(x.size for x in jax.tree.leaves(
            nnx.state(self.task.exported_model(self.model), nnx.Param)))),
        "trained_params": int(sum(x.size for x in jax.tree.leaves(self.params))),
        "tokens_seen": int(run["tokens_seen"]),
        "steps": int(run["step"]),
        "stopped_early": bool(run["stopped_early"]),
        "wall_seconds": round(wall, 1),
        "train_seconds": round(run["train_seconds"], 1),
        **_prefixed("val", val), **_prefixed("test", test),
        "unigram_perplexity": val.get("unigram_perplexity"),
        "corpus": {k: v for k, v in corpus.manifest.items() if k != "settings"},
    }
    if not self.primary:
      return rep
    rep.update(self.task.samples(self.model, corpus, self.evaluator, self.cfg))
    if self.task.finetune:  # eval.json: the test split's metrics
      rep["best_step"] = run.get("best_step")
      write_json(os.path.join(self.workdir, "eval.json"),
                 {"split": "test", "step": int(run["step"]), "best_step": run.get("best_step"),
                  **{k: v for k, v in rep.items() if k.startswith("test_")},
                  **{k: rep[k] for k in ("samples_metrics",) if k in rep}})
    write_json(os.path.join(self.workdir, "report.json"), rep)
    print(report_lib.format_report(rep, self.task))
    return rep

def _scalars(metrics: dict) -> dict[str, float]:
  """The numbers of a metrics dict (metrics.jsonl and the log lines take no tables)."""
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def write_json(path: str, obj) -> None:
  try:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2)
  except OSError as e:
    raise DataError(f"cannot write {path}: {e.strerror or e}") from None


def evaluate(cfg, workdir: str) -> dict[str, Any]:
  """--mode=eval: every metric of the task for the latest checkpoint (the best one under
  train.keep_best) on eval.split (default: validation and test); writes eval.json."""
  sub = "best" if cfg.train.keep_best and os.path.isdir(os.path.join(workdir, "best")) \
      else "checkpoints"
  if not os.path.isdir(os.path.join(workdir, sub)):
    raise ConfigError(f"--workdir {workdir}: no checkpoints to evaluate (train first)")
  splits = (cfg.eval.split,) if cfg.eval.split else ("validation", "test")
  mesh = make_mesh(cfg.mesh)
  with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.rules):
    corpus, model, task = setup(cfg, workdir, mesh)
    graphdef, params, frozen, _, _, opt_state, _ = sharded_train_state(model, cfg, mesh)
    ckpt = Checkpointer(os.path.join(workdir, sub), max_to_keep=cfg.checkpoint.max_to_keep,
                        read_only=True)
    found = ckpt.restore_latest((params, opt_state), log)
    if found is None:
      raise ConfigError(f"--workdir {workdir}: no checkpoints to evaluate (train first)")
    (params, _), _, step = found
    ckpt.close()
    evaluator = Evaluator(corpus, cfg, graphdef, task, model.config.vocab_size,
                          batch_sharding=batch_sharding(cfg, mesh))
    state = params if frozen is None else (params, frozen)
    out: dict[str, Any] = {"step": int(step), "checkpoint": sub}
    for split in splits:
      out.update(_prefixed("val" if split == "validation" else split, evaluator(state, split)))
    if task.finetune and "test" in splits and distributed.is_primary():
      # What the task scores beyond the batch statistics (decoded answers, whole scenes).
      nnx.update(model, distributed.fully_replicated_host(params))
      out.update({k: v for k, v in task.samples(model, corpus, evaluator, cfg).items()
                  if k.startswith("test_")})
  if distributed.is_primary():
    write_json(os.path.join(workdir, "eval.json"), out)
    print(json.dumps(out, indent=2))
  return out
