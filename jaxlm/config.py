"""ModelConfig: the architecture description, modelled on transformers' BertConfig.

One config class serves every family: later families add fields with defaults that
leave earlier models unchanged. Validation runs on construction, so a bad config
fails before anything is compiled or written, with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from jaxlm.errors import ConfigError
from jaxlm.layers.activations import ACTIVATIONS

CONFIG_NAME = "config.json"

# Bookkeeping keys that Hugging Face writes into config.json; they do not change
# the architecture, so reading them is not an "unknown key".
_HF_IGNORED_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "use_cache", "gradient_checkpointing",
    "_name_or_path", "problem_type",
    "output_past", "return_dict", "output_hidden_states", "output_attentions",
    "is_decoder", "add_cross_attention", "chunk_size_feed_forward", "pruned_heads",
    "tie_encoder_decoder", "torchscript",
})

# Keys that jaxlm exports wrote before the runtime fields left ModelConfig: read and
# dropped, so old exports still load (the caller picks the runtime).
LEGACY_RUNTIME_KEYS = frozenset({"dtype", "attention_impl", "attention_backend", "remat"})
# Marks a config.json as a jaxlm export rather than a Hugging Face checkpoint.
EXPORT_MARKER = "jaxlm_export"

_DTYPES = ("float32", "bfloat16", "float16")
LAYER_TYPES = ("full_attention", "sliding_attention")  # ModelConfig.layer_types entries
QK_NORMS = (None, "rmsnorm", "layernorm")  # ModelConfig.qk_norm
_CHOICES = {
    "norm_type": ("layernorm", "rmsnorm"),
    "norm_position": ("post", "pre"),
    "mlp_type": ("plain", "gated"),
    "position_embedding_type": ("absolute", "rope", "alibi", "relative", "none"),
    "alibi_style": ("bloom", "falcon"),
}


def read_json_object(path: str | os.PathLike, error: type[Exception] = ConfigError) -> dict:
  """A JSON file holding an object (config.json); anything else is `error` naming it."""
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except FileNotFoundError:
    raise error(f"{path}: no such file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f"{path}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise error(f"{path}: not a JSON object")
  return d


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a model runs rather than what it is: never part of config.json. Set by the
  experiment config (model.dtype, model.attention_impl, model.remat, train.precision) or
  `jaxlm.from_pretrained(dir, dtype=..., attention_impl=..., remat=...)`."""

  dtype: str = "float32"  # compute dtype of matmuls; parameters keep param_dtype
  # "xla" (reference), "pallas" (jaxlm's flash kernel), "cudnn", "auto"
  attention_impl: str = "xla"
  # Rematerialization of each block in the backward pass: "none", "full" (keep only the
  # block inputs) or "dots" (keep the matmul outputs, recompute the rest).
  remat: str = "none"

  CHOICES = {"dtype": _DTYPES, "attention_impl": ("xla", "pallas", "cudnn", "auto"),
             "remat": ("none", "full", "dots")}

  def __post_init__(self):
    for name, choices in self.CHOICES.items():
      if getattr(self, name) not in choices:
        raise ConfigError(f"model.{name} must be one of {choices}, got {getattr(self, name)!r}")

  def replace(self, **kwargs) -> Runtime:
    return dataclasses.replace(self, **{k: v for k, v in kwargs.items() if v is not None})


@dataclasses.dataclass
class ModelConfig:
  """Architecture hyperparameters. Field names follow Hugging Face where one exists."""

  model_type: str = "bert"
  architectures: list[str] | None = None
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  tie_word_embeddings: bool = True

  # ---- block layout: the defaults are BERT; decoders flip what they need --------------
  causal: bool = False  # decoder-only: causal self-attention
  norm_type: str = "layernorm"  # "layernorm" | "rmsnorm" (eps: layer_norm_eps)
  norm_position: str = "post"  # "post" (BERT) | "pre" (GPT, Llama, ...; adds a final norm)
  norm_bias: bool = True  # LayerNorm with a bias (MPT has none)
  embedding_norm: bool = False  # a norm straight after the token embedding (BLOOM)
  mlp_type: str = "plain"  # "plain": act(up x) | "gated": act(gate x) * up x (SwiGLU/GeGLU)
  mlp_bias: bool = True
  attention_bias: bool = True  # q/k/v projection biases
  attention_out_bias: bool | None = None  # output projection bias (None: attention_bias)
  parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX)
  # parallel_residual with ONE norm feeding both branches: h = ln x; x + attn h + mlp h
  # (Falcon-7B, Cohere)
  parallel_shared_norm: bool = False
  # pre-LN plus a norm on each sublayer's output before the residual add (Gemma 2):
  # x = x + norm(attn(norm x)); x = x + norm(ff(norm x))
  sandwich_norm: bool = False
  # RMSNorm multiplies by (norm_scale_offset + scale): Gemma stores scale - 1 (offset 1.0)
  norm_scale_offset: float = 0.0
  scale_embeddings: bool = False  # token embeddings times sqrt(hidden_size) (Gemma)
  sliding_window: int | None = None  # attend iff 0 <= i - j < sliding_window
  # Which layers use sliding_window, as HF spells it: "sliding_attention" |
  # "full_attention" per layer (Gemma 2 alternates them). None: every layer uses
  # sliding_window (if set).
  layer_types: list[str] | None = None
  # Logits scale 1/sqrt(query_pre_attn_scalar) (Gemma 2); None: 1/sqrt(head_dim)
  query_pre_attn_scalar: float | None = None
  # cap * tanh(x / cap) on the scaled attention logits / the LM head's logits (Gemma 2)
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  logit_scale: float | None = None  # the LM head's logits times this (Cohere); None: 1
  # A norm on each head's queries and keys before RoPE: "rmsnorm" (one [head_dim] scale
  # shared by the heads, with norm_scale_offset; Qwen3, Gemma 3) or "layernorm" (bias-free,
  # a scale per head [heads, head_dim]; Cohere). None: no q/k norm.
  qk_norm: str | None = None
  # q, k and v clamped to [-clip_qkv, clip_qkv] right after their projections (DBRX)
  clip_qkv: float | None = None

  # ---- positions ------------------------------------------------------------------
  # "relative": T5's bucketed relative-position logits bias (encoder-decoder models)
  position_embedding_type: str = "absolute"  # "absolute" | "rope" | "alibi" | "relative" | "none"
  position_ids_from_mask: bool = False  # RoBERTa: positions count real tokens from pad+1
  rope_theta: float = 10000.0
  partial_rotary_factor: float = 1.0  # fraction of each head's dims that rotate (NeoX)
  # {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor",
  #  "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} or
  # {"rope_type": "longrope", "short_factor": [..], "long_factor": [..],
  #  "original_max_position_embeddings", optional "factor" / "attention_factor"} (Phi-3)
  rope_scaling: dict | None = None
  # RoPE base of the "sliding_attention" layers of layer_types, which then rotate without
  # rope_scaling (Gemma 3's local layers); None: every layer uses rope_theta / rope_scaling.
  rope_local_base_freq: float | None = None
  # RoPE rotates dim pairs (2i, 2i+1) (Cohere; GPT-J style) instead of (i, i + R/2) (Llama)
  rope_interleaved: bool = False
  # "bloom" (BLOOM, MPT): bias slope * key_position; "falcon": that bias computed in
  # bfloat16 and scaled by 1/sqrt(head_dim) like the logits (transformers' Falcon)
  alibi_style: str = "bloom"
  relative_attention_num_buckets: int = 32  # T5 relative bias
  relative_attention_max_distance: int = 128

  # ---- encoder-decoder (T5) ---------------------------------------------------------
  num_decoder_layers: int | None = None  # None: num_hidden_layers
  decoder_start_token_id: int | None = None  # first decoder input (T5: the pad id)

  # ---- mixture of experts: any family's MLP becomes a sparse MoE when experts > 0 ----
  num_local_experts: int = 0  # 0: dense MLP
  num_experts_per_tok: int = 2  # top-k
  router_aux_loss_coef: float = 0.001  # load-balancing loss weight (HF Mixtral default)
  router_z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE); 0 = off
  moe_capacity_factor: float | None = None  # None: dropless; else capacity per expert
  # The top-k routing weights are divided by their p-norm: 1.0 = their sum (Mixtral), 2.0
  # the Euclidean norm (a DBRX option); None keeps the softmax probabilities as they are.
  router_norm_p: float | None = 1.0
  # Storage dtype of the parameters (what a checkpoint holds). The compute dtype is a
  # Runtime choice.
  param_dtype: str = "float32"

  # ---- task heads (models/heads.py): classification and extractive QA --------------------
  # The head's layout follows from the architecture (BertForSequenceClassification pools
  # through the pooler, RoBERTa/DistilBERT read token 0, decoders their last real token).
  num_labels: int = 2
  # Label names by id, as in HF config.json; JSON keys are strings ("0"), kept here as ints.
  id2label: dict | None = None  # None: transformers' defaults LABEL_0 ... LABEL_{n-1}
  label2id: dict | None = None
  classifier_dropout: float | None = None  # None: hidden_dropout_prob (as transformers)

  def __post_init__(self):
    self._normalize_labels()
    self.validate()

  def _normalize_labels(self) -> None:
    """JSON (and HF config.json) spells label ids as strings: {"0": "neg"} -> {0: "neg"}."""
    for name, key_is_id in (("id2label", True), ("label2id", False)):
      d = getattr(self, name)
      if d is None:
        continue
      if not isinstance(d, dict):
        raise ConfigError(f"model.{name} must be a dict or None, got {d!r}")
      try:
        d = ({int(k): str(v) for k, v in d.items()} if key_is_id
             else {str(k): int(v) for k, v in d.items()})
      except (TypeError, ValueError):
        raise ConfigError(f"model.{name}: label ids must be integers, got {d!r}") from None
      setattr(self, name, d)

  def __hash__(self):
    # Models keep their config as static data, and compiled functions that take a model's
    # graph as a static argument (jaxlm.generate) need it hashable. Treat configs as
    # immutable (`replace` makes a new one).
    return hash(self.to_json_string())

  # ---- validation -----------------------------------------------------------------
  def validate(self) -> None:
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    if self.type_vocab_size < 0:
      raise ConfigError(f"model.type_vocab_size must be >= 0, got {self.type_vocab_size}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ConfigError(
          f"model.hidden_size ({self.hidden_size}) must be divisible by "
          f"model.num_attention_heads ({self.num_attention_heads})")
    kv = self.kv_heads
    if kv <= 0 or self.num_attention_heads % kv:
      raise ConfigError(
          f"model.num_key_value_heads ({kv}) must divide model.num_attention_heads "
          f"({self.num_attention_heads})")
    if self.hidden_act not in ACTIVATIONS:
      raise ConfigError(
          f"model.hidden_act: unknown activation {self.hidden_act!r}; "
          f"choose one of {sorted(ACTIVATIONS)}")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      p = getattr(self, name)
      if not 0.0 <= p < 1.0:
        raise ConfigError(f"model.{name} must be in [0, 1), got {p}")
    if self.param_dtype not in _DTYPES:
      raise ConfigError(f"model.param_dtype must be one of {_DTYPES}, got {self.param_dtype!r}")
    for name, choices in _CHOICES.items():
      if getattr(self, name) not in choices:
        raise ConfigError(f"model.{name} must be one of {choices}, got {getattr(self, name)!r}")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ConfigError(f"model.sliding_window must be positive, got {self.sliding_window}")
    self._validate_block_options()
    if not 0.0 < self.partial_rotary_factor <= 1.0:
      raise ConfigError(
          f"model.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
    if self.rope_scaling is not None:
      kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
      if kind not in ("linear", "llama3", "longrope", "default"):
        raise ConfigError(f"model.rope_scaling: unknown rope_type {kind!r} "
                          "(supported: linear, llama3, longrope)")
      if kind == "longrope":
        self._validate_longrope()

    if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
      raise ConfigError(f"model.num_decoder_layers must be positive, got {self.num_decoder_layers}")
    for name in ("relative_attention_num_buckets", "relative_attention_max_distance"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.num_local_experts < 0:
      raise ConfigError(f"model.num_local_experts must be >= 0, got {self.num_local_experts}")
    if self.num_local_experts and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
      raise ConfigError(
          f"model.num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
          f"model.num_local_experts ({self.num_local_experts})")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
      if getattr(self, name) < 0:
        raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
    self._validate_labels()
    if self.router_norm_p is not None and not self.router_norm_p > 0:
      raise ConfigError(f"model.router_norm_p must be positive or None, got "
                        f"{self.router_norm_p!r}")
    if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
      raise ConfigError(
          f"model.moe_capacity_factor must be positive (or None: dropless), "
          f"got {self.moe_capacity_factor}")

  def _validate_block_options(self) -> None:
    """The per-layer attention pattern, soft-capping, scales and the sandwich norm."""
    types = self.layer_types
    if types is not None:
      if (not isinstance(types, (list, tuple)) or len(types) != self.num_hidden_layers
          or not set(types) <= set(LAYER_TYPES)):
        raise ConfigError(f"model.layer_types must list one of {LAYER_TYPES} for each of the "
                          f"{self.num_hidden_layers} layers, got {types!r}")
      if "sliding_attention" in types and self.sliding_window is None:
        raise ConfigError("model.layer_types has sliding_attention layers but "
                          "model.sliding_window is None")
      self.layer_types = list(types)  # a tuple from a ConfigDict: one spelling, one hash
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping",
                 "final_logit_softcapping", "clip_qkv"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ConfigError(f"model.{name} must be positive or None, got {value!r}")
    local = self.rope_local_base_freq
    if local is not None and not (local > 0 and self.position_embedding_type == "rope"
                                  and self.layer_types is not None):
      raise ConfigError("model.rope_local_base_freq must be positive and needs "
                        "model.position_embedding_type='rope' and model.layer_types (it is the "
                        f"base of the sliding_attention layers), got {local!r}")
    if self.qk_norm not in QK_NORMS:
      raise ConfigError(f"model.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
    if self.norm_scale_offset and self.norm_type != "rmsnorm":
      raise ConfigError("model.norm_scale_offset needs model.norm_type='rmsnorm', got "
                        f"{self.norm_type!r}")
    if self.parallel_shared_norm and not self.parallel_residual:
      raise ConfigError("model.parallel_shared_norm needs model.parallel_residual")
    if self.logit_scale is not None and (isinstance(self.logit_scale, bool) or not isinstance(
        self.logit_scale, (int, float)) or not math.isfinite(self.logit_scale)
        or self.logit_scale == 0):
      raise ConfigError(f"model.logit_scale must be a finite nonzero number or None, got "
                        f"{self.logit_scale!r}")
    if self.sandwich_norm and (self.norm_position != "pre" or self.parallel_residual):
      raise ConfigError("model.sandwich_norm needs model.norm_position='pre' and no "
                        "model.parallel_residual")

  def _validate_longrope(self) -> None:
    """Phi-3's long-context RoPE: one factor per rotary frequency, for short and long
    sequences, switching past original_max_position_embeddings."""
    sc = self.rope_scaling
    half = int(self.head_size * self.partial_rotary_factor) // 2
    for key in ("short_factor", "long_factor"):
      f = sc.get(key)
      if (not isinstance(f, (list, tuple)) or len(f) != half
          or not all(isinstance(x, (int, float)) and x > 0 for x in f)):
        raise ConfigError(f"model.rope_scaling.{key} must list {half} positive numbers (one "
                          f"per rotary frequency), got {f!r}")
    orig = sc.get("original_max_position_embeddings")
    if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
      raise ConfigError("model.rope_scaling.original_max_position_embeddings must be a "
                        f"positive integer for longrope, got {orig!r}")
    for key in ("factor", "attention_factor"):
      if sc.get(key) is not None and not sc[key] > 0:
        raise ConfigError(f"model.rope_scaling.{key} must be positive, got {sc[key]!r}")

  def layer_windows(self) -> list[int | None]:
    """Each layer's attention window (None: full attention)."""
    if self.layer_types is None:
      return [self.sliding_window] * self.num_hidden_layers
    return [self.sliding_window if t == "sliding_attention" else None
            for t in self.layer_types]

  def _validate_labels(self) -> None:
    n = self.num_labels
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise ConfigError(f"model.num_labels must be a positive integer, got {n!r}")
    if self.id2label is not None and set(self.id2label) != set(range(n)):
      raise ConfigError(f"model.id2label must name the ids 0..{n - 1} of model.num_labels={n}, "
                        f"got ids {sorted(self.id2label)}")
    # Several names may share an id (transformers checks nothing), but every id must exist.
    if self.label2id is not None and not set(self.label2id.values()) <= set(range(n)):
      raise ConfigError(f"model.label2id maps to ids outside 0..{n - 1} of model.num_labels="
                        f"{n}: {sorted(set(self.label2id.values()) - set(range(n)))}")
    p = self.classifier_dropout
    if p is not None and not 0.0 <= p < 1.0:
      raise ConfigError(f"model.classifier_dropout must be in [0, 1) or None, got {p}")

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_hidden_layers

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  # ---- (de)serialization ------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json_string(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

  @classmethod
  def from_dict(cls, d: dict[str, Any], *, hf: bool = False) -> ModelConfig:
    """Builds a config; an unknown key is an error naming it.

    With `hf=True`, Hugging Face bookkeeping keys (transformers_version, ...) are
    skipped rather than rejected.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
      if key in names:
        kwargs[key] = value
      elif key in LEGACY_RUNTIME_KEYS or key == EXPORT_MARKER:
        continue
      elif not (hf and key in _HF_IGNORED_KEYS):
        raise ConfigError(f"model.{key}: unknown ModelConfig key")
    if hf and kwargs.get("id2label") and "num_labels" not in kwargs:
      kwargs["num_labels"] = len(kwargs["id2label"])  # HF configs imply it (no such key)
    return cls(**kwargs)

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
    return cls.from_dict(read_json_object(path), hf=True)

  @classmethod
  def from_pretrained(cls, directory: str | os.PathLike) -> ModelConfig:
    """Reads `config.json` from a local directory (jaxlm or Hugging Face)."""
    path = os.path.join(directory, CONFIG_NAME) if os.path.isdir(directory) else directory
    return cls.from_json_file(path)

  def save_pretrained(self, directory: str | os.PathLike) -> str:
    """config.json of a jaxlm export (marked as such, so loaders do not read it as HF)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CONFIG_NAME)
    with open(path, "w", encoding="utf-8") as f:
      f.write(json.dumps({**self.to_dict(), EXPORT_MARKER: 1}, indent=2, sort_keys=True) + "\n")
    return path

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)
