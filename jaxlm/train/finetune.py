"""Fine-tuning: the head model from a pretrained one, what trains (freezing, LoRA), the
optimizer (a separate head learning rate), and the keys of the `finetune` config section.

The fine-tuned model is the task's head class (e.g. BertForSequenceClassification)
built on the pretrained config; the pretrained weights are copied in by name, and the
names that do not match are listed once: the new head ("missing") and the pretraining
heads left behind ("unexpected"). A shape mismatch is an error naming the tensor.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError
from jaxlm.models import auto
from jaxlm.params import path_name
from jaxlm.peft import lora
from jaxlm.train import optim
from jaxlm.train.optim import SkipNonFinite

# The attribute holding the pretrained body in every head class; the rest is the head.
BODY = ("bert", "model")
FREEZE = ("", "embeddings", "all_but_head")  # or "layers:N"


def check(cfg) -> None:
  """The `finetune` keys (config-time, before anything is written)."""
  f = cfg.finetune
  if f.freeze not in FREEZE and not re.fullmatch(r"layers:\d+", f.freeze):
    raise ConfigError(f"finetune.freeze must be one of {FREEZE} or 'layers:N', got {f.freeze!r}")
  if f.head_learning_rate < 0:
    raise ConfigError(f"finetune.head_learning_rate must be >= 0, got {f.head_learning_rate}")
  if f.lora.rank:
    lora_config(cfg)
    if f.freeze:
      raise ConfigError("finetune.freeze: with finetune.lora.rank > 0 only the adapters and "
                        "the head train already; leave freeze empty")


def lora_config(cfg, model: nnx.Module | None = None) -> lora.LoRAConfig:
  """finetune.lora as a LoRAConfig; with `model`, its head modules train and save in full
  (PEFT's modules_to_save)."""
  f = cfg.finetune.lora
  return lora.LoRAConfig(rank=f.rank, alpha=f.alpha, dropout=f.dropout,
                         targets=tuple(f.targets),
                         modules_to_save=head_names(model) if model is not None else ())


def head_names(model: nnx.Module) -> tuple[str, ...]:
  """The top-level modules outside the pretrained body: the head."""
  body = _body(model)
  return tuple(sorted({path_name(p).split(".")[0]
                       for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))} - {body}))


def _body(model) -> str:
  """The attribute holding the pretrained body."""
  for name in BODY:
    if hasattr(model, name):
      return name
  raise ConfigError(f"{type(model).__name__} has no pretrained body ({' or '.join(BODY)})")


def load_body(model: nnx.Module, pretrained: nnx.Module, source: str, log=print) -> dict:
  """Copies `pretrained`'s parameters into `model` by name (a bare base model's names get
  the body prefix); returns the missing and unexpected names, logged once."""
  body = _body(model)
  theirs = {path_name(p): v for p, v in nnx.to_flat_state(nnx.state(pretrained, nnx.Param))}
  mine = {path_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  if not any(n.startswith(body + ".") for n in theirs):  # a bare BertModel / Decoder
    theirs = {f"{body}.{n}": v for n, v in theirs.items()}
  for name, var in mine.items():
    if name in theirs:
      have, want = theirs[name].get_value().shape, var.get_value().shape
      if tuple(have) != tuple(want):
        raise ConfigError(f"model.init_from={source}: tensor {name!r} has shape {tuple(have)} "
                          f"in the checkpoint but {tuple(want)} in the model the config "
                          "describes")
      var.set_value(jnp.asarray(theirs[name].get_value(), var.get_value().dtype))
  missing = sorted(set(mine) - set(theirs))
  unexpected = sorted(set(theirs) - set(mine))
  if missing:
    log(f"fine-tune: newly initialized (not in {source}): {', '.join(missing)}")
  if unexpected:
    log(f"fine-tune: not used (in {source} only): {', '.join(unexpected)}")
  return {"missing": missing, "unexpected": unexpected}


def build(cfg, task, data, pretrained: nnx.Module, runtime: Runtime, source: str,
          log=print) -> tuple[nnx.Module, dict]:
  """The fine-tuned model: the task's head class on the pretrained config, the pretrained
  weights loaded (unless finetune.from_scratch), LoRA applied when configured."""
  head_cfg: ModelConfig = task.head_config(pretrained.config, data)
  model = auto.build_model(head_cfg, runtime=runtime, seed=cfg.seed)
  info = {"init": "random (finetune.from_scratch)"}
  if not cfg.finetune.from_scratch:
    info = load_body(model, pretrained, source, log)
  if cfg.finetune.lora.rank:
    lora.apply_lora(model, lora_config(cfg), rngs_seed=cfg.seed)
  return model, info


def trainable(cfg, model: nnx.Module):
  """The nnx filter of the parameters that train, or None for all of them."""
  f = cfg.finetune
  body = _body(model)
  if f.lora.rank:
    return lora.trainable_filter(head_names(model), model=model)
  if not f.freeze:
    return None
  if f.freeze == "all_but_head":
    frozen = lambda name: name.startswith(body + ".")
  else:
    n = int(f.freeze.split(":")[1]) if f.freeze.startswith("layers:") else 0
    num_layers = model.config.num_hidden_layers
    if n > num_layers:
      raise ConfigError(f"finetune.freeze={f.freeze!r}: the model has {num_layers} layers")

    def frozen(name):
      parts = name.split(".")
      if parts[0] != body:
        return False
      if parts[1] in ("embeddings", "embed", "position", "embed_norm"):
        return True
      return parts[1] == "layers" and int(parts[2]) < n

  def pred(path, value):
    return isinstance(value, nnx.Param) and not frozen(path_name(path))

  return pred


def split(model: nnx.Module, filt):
  """(graphdef, trained params, frozen state or None)."""
  if filt is None:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, None
  graphdef, params, rest = nnx.split(model, filt, ...)
  return graphdef, params, rest


def make_optimizer(t, f, params) -> tuple[SkipNonFinite, optax.Schedule]:
  """AdamW (or SGD) as in pretraining, over `params` (the trained ones only); the head
  (parameters outside the body) gets finetune.head_learning_rate when that is set."""
  if not f.head_learning_rate:
    return optim.make_optimizer(t)
  body, schedule = optim.make_optimizer(t)
  head_t = ml_collections.ConfigDict(t.to_dict())
  head_t.learning_rate = f.head_learning_rate
  head, _ = optim.make_optimizer(head_t)
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "body" if _key(p[0]) in BODY else "head", params)
  return SkipNonFinite(optax.multi_transform({"body": body.inner, "head": head.inner},
                                             labels)), schedule


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", k)))
