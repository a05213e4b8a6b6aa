"""The experiment config schema: every key a config file may set, with its default.

Config files start from `base_config()` and override what they need, so the full
set of keys lives in one place; `validate` rejects any key not in the schema (a
typo in a config file fails as loudly as one in a --config.x override) and checks
cross-section constraints before anything is compiled or written.
"""

from __future__ import annotations

import ml_collections

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(ModelConfig().to_dict())
  c.model.architectures = ["BertForPreTraining"]

  c.data = ml_collections.ConfigDict()
  c.data.source = "embedded"  # "embedded" | path or glob of .txt/.md/.jsonl | "tfds:NAME[/CONFIG]"
  c.data.text_key = "text"  # jsonl and tfds field holding the text
  c.data.tfds_split = "train"  # the tfds split we read, then re-split by document hash
  c.data.split = (0.9, 0.05, 0.05)  # train / validation / test fractions
  c.data.max_seq_len = 128
  c.data.mask_prob = 0.15
  c.data.num_threads = 2  # grain reader threads
  c.data.prefetch = 8  # examples buffered ahead of the train step
  # Lowercasing, stopword removal, lemmatization and punctuation removal change the
  # text the LM must learn to predict, so they stay off for pretraining.
  c.data.clean = ml_collections.ConfigDict(dict(
      normalization="NFKC", strip_markup=True, lowercase=False, remove_stopwords=False,
      lemmatize=False, remove_punctuation=False, min_chars=200))

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "wordpiece"  # "wordpiece" | "sentencepiece"
  c.tokenizer.model_type = "unigram"  # sentencepiece: "unigram" | "bpe"
  c.tokenizer.vocab_size = 8192
  c.tokenizer.lowercase = False
  c.tokenizer.seed = 0
  c.tokenizer.path = ""  # a ready-made tokenizer.json / vocab.txt / spm .model instead

  c.train = ml_collections.ConfigDict()
  c.train.objective = "mlm+nsp"  # "mlm" | "nsp" | "mlm+nsp"
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.optimizer = "adamw"  # "adamw" | "sgd" (with momentum)
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.decay = "linear"  # "linear" | "cosine" | "constant", after warmup
  c.train.end_learning_rate_factor = 0.0
  c.train.weight_decay = 0.01  # never applied to biases and norms
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-6
  c.train.momentum = 0.9  # sgd only
  c.train.grad_clip_norm = 1.0  # 0 disables
  c.train.eval_every = 200
  c.train.log_every = 20
  c.train.early_stopping_patience = 0  # evals without val-loss improvement; 0 = off

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.max_batches = 0  # 0 = the whole split
  c.eval.fill_mask_examples = 5

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200
  c.checkpoint.max_to_keep = 2
  return c


def _check_keys(cfg, schema, prefix: str = "") -> None:
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(f"{name}: unknown config key")
    if isinstance(schema[key], ml_collections.ConfigDict) and key != "model":
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"{name}: must be a section, got {cfg[key]!r}")
      _check_keys(cfg[key], schema[key], name + ".")


def model_config(cfg) -> ModelConfig:
  return ModelConfig.from_dict(cfg.model.to_dict())


def validate(cfg) -> ModelConfig:
  """Checks the whole experiment config; returns its ModelConfig."""
  _check_keys(cfg, base_config())
  model = model_config(cfg)
  d, t = cfg.data, cfg.train
  if d.max_seq_len > model.max_position_embeddings:
    raise ConfigError(
        f"data.max_seq_len ({d.max_seq_len}) exceeds model.max_position_embeddings "
        f"({model.max_position_embeddings})")
  if d.max_seq_len < 8:
    raise ConfigError(f"data.max_seq_len must be >= 8, got {d.max_seq_len}")
  if not 0.0 < d.mask_prob < 1.0:
    raise ConfigError(f"data.mask_prob must be in (0, 1), got {d.mask_prob}")
  for key in ("steps", "batch_size", "eval_every", "log_every"):
    if t[key] <= 0:
      raise ConfigError(f"train.{key} must be positive, got {t[key]}")
  if cfg.checkpoint.every <= 0 or cfg.checkpoint.max_to_keep <= 0:
    raise ConfigError("checkpoint.every and checkpoint.max_to_keep must be positive")
  if t.warmup_steps < 0:
    raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
  if t.optimizer not in ("adamw", "sgd"):
    raise ConfigError(f"train.optimizer must be 'adamw' or 'sgd', got {t.optimizer!r}")
  if t.decay not in ("linear", "cosine", "constant"):
    raise ConfigError(f"train.decay must be linear, cosine or constant, got {t.decay!r}")
  if cfg.tokenizer.kind not in ("wordpiece", "sentencepiece"):
    raise ConfigError(f"tokenizer.kind must be wordpiece or sentencepiece, "
                      f"got {cfg.tokenizer.kind!r}")
  if len(tuple(d.split)) != 3:
    raise ConfigError("data.split must be three fractions (train, validation, test)")
  return model


def with_overrides(cfg, **sections) -> ml_collections.ConfigDict:
  """Returns a copy with {section: {key: value}} applied (used by `:tiny` variants)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for section, values in sections.items():
    for key, value in values.items():
      if key not in cfg[section]:
        raise ConfigError(f"{section}.{key}: unknown config key")
      cfg[section][key] = value
  return cfg

