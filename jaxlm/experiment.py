"""The experiment config schema: every key a config file may set, with its default.

Config files start from `base_config()` and override what they need, so the full
set of keys lives in one place; `validate` rejects any key not in the schema (a
typo in a config file fails as loudly as one in a --config.x override) and checks
cross-section constraints before anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from jaxlm import tasks
from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError
from jaxlm.parallel.rules import DEFAULT_RULES
from jaxlm.pretrained import resolve_dir
from jaxlm.train import finetune

# model.* keys that say how the model runs (jaxlm.config.Runtime), not what it is.
RUNTIME_KEYS = tuple(f.name for f in dataclasses.fields(Runtime))
# model.* keys that are training choices, not architecture: under model.init_from the
# config file may set them; every other model key comes from the pretrained checkpoint.
RUNTIME_MODEL_KEYS = (*RUNTIME_KEYS, "hidden_dropout_prob", "attention_probs_dropout_prob")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(ModelConfig().to_dict())
  c.model.update(dataclasses.asdict(Runtime()))  # dtype, attention_impl, remat
  c.model.architectures = ["BertForPreTraining"]
  # A pretrained checkpoint (HF or jaxlm export) to start from; it then decides the
  # architecture and the tokenizer (not a ModelConfig field).
  c.model.init_from = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "embedded"  # "embedded" | path or glob of .txt/.md/.jsonl | "tfds:NAME[/CONFIG]"
  c.data.text_key = "text"  # jsonl and tfds field holding the text
  c.data.tfds_split = "train"  # the tfds split we read, then re-split by document hash
  c.data.split = (0.9, 0.05, 0.05)  # train / validation / test fractions
  c.data.max_seq_len = 128
  c.data.mask_prob = 0.15
  # span_corruption (T5): data.max_seq_len is the encoder length after corruption
  c.data.noise_density = 0.15
  c.data.mean_noise_span_length = 3.0
  c.data.num_sentinels = 100  # <extra_id_i>; appended to the vocabulary if missing
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
  # A registered task (jaxlm/tasks/): "mlm" | "nsp" | "mlm+nsp" | "sop" (BERT),
  # "causal" (decoders), "span_corruption" (T5)
  c.train.objective = "mlm+nsp"
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
  # "fp32", or "bf16": f32 master params and optimizer state, bf16 matmul inputs with f32
  # accumulation, softmax and loss in f32. "" leaves model.dtype as the config sets it.
  c.train.precision = ""
  c.train.grad_accum_steps = 1  # microbatches per step (train.batch_size is the total)
  # A step whose loss or gradient norm is not finite is never applied (train/optim.py).
  # "stop": end the run there; "skip": go on, and stop after max_skipped_steps in a row.
  c.train.nan_policy = "stop"
  c.train.max_skipped_steps = 10
  # The validation metric early stopping and keep_best watch (lower is better for loss
  # and perplexity, higher for the rest); keep_best ends the run with the best one's model.
  c.train.early_stopping_metric = "loss"
  c.train.keep_best = False

  # Fine-tuning (train.objective classify | token_classify | extractive_qa | sft; see
  # jaxlm/train/finetune.py): model.init_from is the pretrained model.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.dataset = ""  # embedded: "genre" | "who_speaks" | "next_speaker"; "": data.source
  c.finetune.labels = ()  # classify from JSONL: the label names (default: those in the file)
  c.finetune.from_scratch = False  # same architecture and tokenizer, random weights
  c.finetune.freeze = ""  # "" | "embeddings" | "layers:N" (and the embeddings) | "all_but_head"
  c.finetune.head_learning_rate = 0.0  # 0: train.learning_rate
  c.finetune.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0, dropout=0.0, targets=("q", "v")))  # rank 0: off
  c.finetune.generate_max_new_tokens = 8  # sft: answers scored at the end
  c.finetune.generate_examples = 300

  # Distillation (train.objective=distill, jaxlm/tasks/distill.py): the student (model.*,
  # or model.init_from) learns from a frozen teacher that shares its tokenizer.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ""  # a jaxlm workdir or export, or a Hugging Face directory
  c.distill.temperature = 2.0  # softens both distributions; the KL term is scaled by T^2
  c.distill.alpha_kl = 1.0  # weight of T^2 KL(teacher || student)
  c.distill.alpha_hard = 1.0  # weight of the student's own loss on the true tokens
  c.distill.alpha_cos = 0.0  # weight of 1 - cos(student, teacher) of the last hidden states
  c.distill.init_from_teacher_layers = False  # student layer i starts as teacher layer 2i

  # Dense retrieval (train.objective=contrastive, jaxlm/tasks/contrastive.py): InfoNCE with
  # in-batch negatives on inverse-cloze pairs (jaxlm/data/ict.py).
  c.contrastive = ml_collections.ConfigDict()
  c.contrastive.temperature = 0.05  # logits = cosine similarity / temperature
  c.contrastive.pooling = "mean"  # "mean" | "cls", as DenseRetriever pools
  c.contrastive.query_max_len = 32  # tokens of a query row ([CLS] line [SEP])
  c.contrastive.min_query_tokens = 6  # shorter lines (speaker names) are never queries
  c.contrastive.keep_query_prob = 0.1  # training: the line stays in its passage (Lee et al.)
  c.contrastive.group_size = 1  # training: G passages of one document together in a batch;
  # 0: every query line with a random window of its document around it (no fixed passages)
  c.contrastive.freeze_embeddings = False  # the word, position and type embeddings stay

  # Retrieval-augmented generation (jaxlm/retrieval/cli.py): --mode=index builds
  # workdir/index from data.source; --mode=rag answers --prompt / --prompts_file from it.
  c.rag = ml_collections.ConfigDict()
  c.rag.retriever = "bm25"  # "bm25" | "dense" | "hybrid" (BM25 + dense, RRF)
  c.rag.encoder = ""  # dense/hybrid: the encoder directory (e.g. a contrastive run's model)
  c.rag.pooling = "mean"  # "mean" | "cls"
  c.rag.tokenizer = ""  # counts chunk tokens; "": the encoder's, else the generator's
  c.rag.chunk_tokens = 64
  c.rag.chunk_overlap = 0
  c.rag.generator = ""  # --mode=rag: the decoder directory; "": model.init_from
  c.rag.template = ""  # a format string with {question} (and {context}, {examples}) or a file
  c.rag.k = 4  # passages retrieved per question (the lowest-ranked go first if too long)
  c.rag.stop = "\n"  # the answer ends at the first one

  # The device mesh: sizes of the data, fsdp, tensor and expert axes (product = device
  # count; one may be -1, "the rest"), and the logical-axis -> mesh-axis rules.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1
  c.mesh.rules = tuple((name, axes) for name, axes in DEFAULT_RULES)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.split = ""  # --mode=eval: one split, or "" for validation and test
  c.eval.max_batches = 0  # 0 = the whole split
  c.eval.fill_mask_examples = 5  # BERT report
  c.eval.samples = 3  # causal report: greedy continuations of test-split prompts
  c.eval.sample_prompt_tokens = 16
  c.eval.sample_new_tokens = 32

  # --mode=generate (jaxlm/generate/cli.py): 0 / 1.0 switch a filter off
  c.generate = ml_collections.ConfigDict()
  c.generate.max_new_tokens = 64
  c.generate.temperature = 0.0  # 0: greedy
  c.generate.top_k = 0
  c.generate.top_p = 1.0
  c.generate.min_p = 0.0
  c.generate.repetition_penalty = 1.0
  c.generate.batch_size = 8  # prompts per compiled call (--prompts_file)
  c.generate.seed = 0
  c.generate.quantize = ""  # "", int8, int4 or bf16: weight-only (jaxlm/compress/quantize.py)
  c.generate.quantize_group_size = 128  # int4: input features per scale

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200
  c.checkpoint.max_to_keep = 2
  return c


# Bounds of numeric keys not checked elsewhere: key -> (low, high, low_open, high_open);
# None = unbounded on that side.
_BOUNDS = {
    "seed": (0, None, False, False),
    "train.learning_rate": (0, None, True, False),
    "train.end_learning_rate_factor": (0, 1, False, False),
    "train.weight_decay": (0, None, False, False),
    "train.b1": (0, 1, False, True), "train.b2": (0, 1, False, True),
    "train.eps": (0, None, True, False), "train.momentum": (0, 1, False, True),
    "train.grad_clip_norm": (0, None, False, False),
    "train.early_stopping_patience": (0, None, False, False),
    "train.max_skipped_steps": (1, None, False, False),
    "eval.batch_size": (1, None, False, False), "eval.max_batches": (0, None, False, False),
    "eval.fill_mask_examples": (0, None, False, False),
    "data.num_threads": (1, None, False, False), "data.prefetch": (0, None, False, False),
    "data.num_sentinels": (0, None, False, False),
    "data.clean.min_chars": (0, None, False, False),
    "tokenizer.vocab_size": (len(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")) + 1, None,
                             False, False),
    "generate.max_new_tokens": (1, None, False, False),
    "generate.temperature": (0, None, False, False), "generate.top_k": (0, None, False, False),
    "generate.top_p": (0, 1, True, False), "generate.min_p": (0, 1, False, False),
    "generate.repetition_penalty": (0, None, True, False),
    "generate.batch_size": (1, None, False, False),
    "generate.quantize_group_size": (1, None, False, False),
    "model.initializer_range": (0, None, True, False),
    "model.layer_norm_eps": (0, None, True, False), "model.rope_theta": (0, None, True, False),
    "finetune.head_learning_rate": (0, None, False, False),
    "finetune.lora.rank": (0, None, False, False), "finetune.lora.alpha": (0, None, True, False),
    "finetune.lora.dropout": (0, 1, False, True),
    "finetune.generate_max_new_tokens": (1, None, False, False),
    "finetune.generate_examples": (0, None, False, False),
    "distill.temperature": (0, None, True, False),
    "distill.alpha_kl": (0, None, False, False), "distill.alpha_hard": (0, None, False, False),
    "distill.alpha_cos": (0, None, False, False),
    "rag.chunk_tokens": (1, None, False, False), "rag.chunk_overlap": (0, None, False, False),
    "rag.k": (0, None, False, False),
}
_CHOICES = {"train.nan_policy": ("stop", "skip"),
            "finetune.dataset": ("", "genre", "who_speaks", "next_speaker"),
            "eval.split": ("", "train", "validation", "test"),
            "generate.quantize": ("", "int8", "int4", "bf16"),
            "rag.retriever": ("bm25", "dense", "hybrid"), "rag.pooling": ("mean", "cls"),
            "tokenizer.model_type": ("unigram", "bpe"),
            "data.clean.normalization": ("NFC", "NFKC", "NFD", "NFKD", "none")}


def _flat(cfg, prefix: str = "") -> dict:
  out = {}
  for key in cfg.keys():
    value = cfg[key]
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _type_ok(value, default) -> bool:
  if default is None:
    return True
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def _check_values(cfg) -> None:
  """Every key has its default's type, numbers sit in their bounds, choices are known."""
  defaults = _flat(base_config())
  for key, value in _flat(cfg).items():
    default = defaults.get(key)
    if not _type_ok(value, default):
      raise ConfigError(f"{key} must be {type(default).__name__}, got {value!r}")
    if key in _BOUNDS:
      lo, hi, lo_open, hi_open = _BOUNDS[key]
      bad = ((lo is not None and (value <= lo if lo_open else value < lo))
             or (hi is not None and (value >= hi if hi_open else value > hi)))
      if bad:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + str(lo)
        hi_s = "inf)" if hi is None else str(hi) + (")" if hi_open else "]")
        raise ConfigError(f"{key} must be in {lo_s or '(-inf'}, {hi_s}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
      raise ConfigError(f"{key} must be one of {_CHOICES[key]}, got {value!r}")
  split = tuple(cfg.data.split)
  if len(split) != 3 or not all(_type_ok(x, 0.0) and x > 0 for x in split) or abs(
      sum(split) - 1.0) > 1e-6:
    raise ConfigError(f"data.split must be three positive fractions (train, validation, "
                      f"test) that sum to 1, got {split!r}")


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
  """The architecture the config file describes (train.precision may set param_dtype)."""
  d = cfg.model.to_dict()
  for key in ("init_from", *RUNTIME_KEYS):
    d.pop(key, None)
  return with_precision(cfg, ModelConfig.from_dict(d))


def runtime(cfg) -> Runtime:
  """How the model runs: model.dtype (or train.precision), attention_impl, remat."""
  rt = Runtime(**{k: cfg.model[k] for k in RUNTIME_KEYS})
  dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(cfg.train.precision)
  return rt if dtype is None else rt.replace(dtype=dtype)


def with_precision(cfg, model: ModelConfig) -> ModelConfig:
  """train.precision, when set, keeps parameters (and so the optimizer state) in float32;
  `runtime` sets the compute dtype."""
  return model if not cfg.train.precision else model.replace(param_dtype="float32")


def task_of(cfg) -> tasks.Task:
  """The task train.objective names: the one registry lookup of a run, bound to the
  config (a task whose behaviour depends on its config section returns a bound copy)."""
  return tasks.get(cfg.train.objective).bind(cfg)


def check_seq_len(cfg, model: ModelConfig, source: str = "model") -> None:
  # ALiBi has no position table, but a longer row still leaves the trained range.
  if cfg.data.max_seq_len > model.max_position_embeddings:
    where = ("model.max_position_embeddings" if source == "model"
             else f"max_position_embeddings of {source}")
    raise ConfigError(f"data.max_seq_len ({cfg.data.max_seq_len}) exceeds {where} "
                      f"({model.max_position_embeddings})")


def pretrained_architectures(directory: str) -> list[str]:
  """`architectures` in the config.json of a model.init_from directory."""
  path = os.path.join(directory, "config.json")
  if not os.path.isdir(directory):
    raise ConfigError(f"model.init_from: no such directory: {directory!r}")
  try:
    with open(path, encoding="utf-8") as f:
      archs = json.load(f).get("architectures") or []
  except FileNotFoundError:
    raise ConfigError(f"model.init_from: {directory} has no config.json") from None
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
    raise ConfigError(f"model.init_from: {path} is not a JSON config ({e})") from None
  if not archs:
    raise ConfigError(f"model.init_from: {path} names no architectures")
  return list(archs)


def pretrained_model_config(cfg, pretrained: ModelConfig, *, strict: bool = True
                            ) -> ModelConfig:
  """The ModelConfig to train under model.init_from: the checkpoint's, with only the
  RUNTIME_MODEL_KEYS taken from the config file.

  A model key that the config file sets (it differs from base_config's default) to a
  value other than the checkpoint's is an error naming the key, rather than being
  silently ignored.
  """
  def plain(d):  # tuples vs lists, ConfigDict vs dict: compare as JSON values
    return json.loads(json.dumps(d))

  default, mine = plain(base_config().model.to_dict()), plain(cfg.model.to_dict())
  theirs = plain(pretrained.to_dict())
  overrides = {}
  for key, value in mine.items():
    if key in ("init_from", *RUNTIME_KEYS) or value == default.get(key) or value == theirs.get(key):
      continue
    if key in RUNTIME_MODEL_KEYS or (not strict and key in theirs and key != "architectures"):
      overrides[key] = value  # not strict (fine-tuning): the weights must then fit
    else:
      raise ConfigError(
          f"model.{key}: the config sets {value!r}, but model.init_from="
          f"{cfg.model.init_from} has {theirs.get(key)!r}; the architecture comes from "
          "the checkpoint, so drop the key (or match it)")
  out = with_precision(cfg, pretrained.replace(**overrides))
  task_of(cfg).check_model(out, f"model.init_from={cfg.model.init_from}")
  check_seq_len(cfg, out, f"model.init_from={cfg.model.init_from}")
  return out


def check_values(cfg) -> None:
  """Known keys, their types, bounds and choices: what every mode checks first."""
  _check_keys(cfg, base_config())
  _check_values(cfg)


def validate(cfg) -> ModelConfig:
  """Checks the whole experiment config; returns its ModelConfig (under model.init_from,
  the config file's; `pretrained_model_config` then checks it against the checkpoint)."""
  check_values(cfg)
  task = task_of(cfg)
  model = model_config(cfg)
  runtime(cfg)  # its choices are checked on construction
  d, t = cfg.data, cfg.train
  if cfg.model.init_from:
    if cfg.tokenizer.path and (os.path.abspath(cfg.tokenizer.path)
                               != os.path.abspath(resolve_dir(cfg.model.init_from))):
      raise ConfigError("tokenizer.path: with model.init_from the tokenizer comes from "
                        f"{cfg.model.init_from}; leave tokenizer.path empty")
    archs = pretrained_architectures(resolve_dir(cfg.model.init_from))
    # The class check only; the loaded config gets the full one (model.causal, lengths).
    task.check_model(ModelConfig(architectures=archs, causal=True),
                     f"model.init_from={cfg.model.init_from}")
  else:
    task.check_model(model, "model.architectures")
    check_seq_len(cfg, model)
  if d.max_seq_len < 8:
    raise ConfigError(f"data.max_seq_len must be >= 8, got {d.max_seq_len}")
  if not 0.0 < d.mask_prob < 1.0:
    raise ConfigError(f"data.mask_prob must be in (0, 1), got {d.mask_prob}")
  if not 0.0 < d.noise_density < 1.0:
    raise ConfigError(f"data.noise_density must be in (0, 1), got {d.noise_density}")
  if d.mean_noise_span_length < 1.0:
    raise ConfigError(f"data.mean_noise_span_length must be >= 1, got {d.mean_noise_span_length}")
  for key in ("steps", "batch_size", "eval_every", "log_every"):
    if t[key] <= 0:
      raise ConfigError(f"train.{key} must be positive, got {t[key]}")
  if cfg.checkpoint.every <= 0 or cfg.checkpoint.max_to_keep <= 0:
    raise ConfigError("checkpoint.every and checkpoint.max_to_keep must be positive")
  if t.precision not in ("", "fp32", "bf16"):
    raise ConfigError(f"train.precision must be 'fp32' or 'bf16' (or '' for model.dtype), "
                      f"got {t.precision!r}")
  if t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.grad_accum_steps ({t.grad_accum_steps}) must be >= 1 and divide "
                      f"train.batch_size ({t.batch_size})")
  if t.warmup_steps < 0:
    raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
  if t.optimizer not in ("adamw", "sgd"):
    raise ConfigError(f"train.optimizer must be 'adamw' or 'sgd', got {t.optimizer!r}")
  if t.decay not in ("linear", "cosine", "constant"):
    raise ConfigError(f"train.decay must be linear, cosine or constant, got {t.decay!r}")
  if cfg.tokenizer.kind not in ("wordpiece", "sentencepiece"):
    raise ConfigError(f"tokenizer.kind must be wordpiece or sentencepiece, "
                      f"got {cfg.tokenizer.kind!r}")
  check_mesh(cfg)
  e = cfg.eval
  if e.samples < 0 or e.sample_prompt_tokens < 1 or e.sample_new_tokens < 1:
    raise ConfigError("eval.samples must be >= 0, eval.sample_prompt_tokens and "
                      "eval.sample_new_tokens >= 1")
  if e.split not in ("", "train", "validation", "test"):
    raise ConfigError(f"eval.split must be train, validation, test or '', got {e.split!r}")
  task.validate(cfg)
  if task.finetune:
    finetune.check(cfg)
  return model


def check_mesh(cfg, num_devices: int | None = None) -> None:
  """The mesh must fit the devices, the rules must name its axes, and every batch must
  split evenly over its data-parallel axes (and the microbatches of accumulation)."""
  import jax  # noqa: PLC0415 - the device count, only when validating
  from jaxlm.parallel.mesh import MESH_AXES, mesh_shape  # noqa: PLC0415
  shape = mesh_shape(cfg.mesh, jax.device_count() if num_devices is None else num_devices)
  for rule in cfg.mesh.rules:
    if len(rule) != 2:
      raise ConfigError(f"mesh.rules: each rule is (logical axis, mesh axes), got {rule!r}")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    unknown = [a for a in axes if a is not None and a not in MESH_AXES]
    if unknown:
      raise ConfigError(f"mesh.rules: {rule[0]!r} maps to unknown mesh axis {unknown[0]!r}; "
                        f"the axes are {MESH_AXES}")
  dp = shape["data"] * shape["fsdp"] * shape["expert"]
  spelled = f"data={shape['data']} x fsdp={shape['fsdp']} x expert={shape['expert']}"
  t = cfg.train
  if t.batch_size % (dp * t.grad_accum_steps):
    raise ConfigError(f"train.batch_size ({t.batch_size}) must divide into "
                      f"train.grad_accum_steps ({t.grad_accum_steps}) microbatches over the "
                      f"{dp} data-parallel devices ({spelled})")
  if cfg.eval.batch_size % dp:
    raise ConfigError(f"eval.batch_size ({cfg.eval.batch_size}) must divide over the {dp} "
                      f"data-parallel devices ({spelled})")


def with_overrides(cfg, **sections) -> ml_collections.ConfigDict:
  """Returns a copy with {section: {key: value}} applied (used by `:tiny` variants)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for section, values in sections.items():
    for key, value in values.items():
      if key not in cfg[section]:
        raise ConfigError(f"{section}.{key}: unknown config key")
      cfg[section][key] = value
  return cfg



def causal_lm_run(c, *, max_seq_len: int, batch_size: int,
                  learning_rate: float) -> ml_collections.ConfigDict:
  """The full-size decoder configs' recipe (GPT-3 style: cosine to 10%, weight decay 0.1,
  beta2 0.95); they differ only in row length, batch size and learning rate."""
  c.tokenizer.vocab_size = 8192
  c.data.max_seq_len = max_seq_len
  c.train.update(objective="causal", steps=2000, batch_size=batch_size,
                 learning_rate=learning_rate, warmup_steps=200, decay="cosine",
                 end_learning_rate_factor=0.1, weight_decay=0.1, b2=0.95, eps=1e-8,
                 eval_every=250)
  c.eval.update(batch_size=batch_size, max_batches=20)
  c.checkpoint.every = 250
  return c


def bench_run(c, *, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
              intermediate_size: int, max_seq_len: int, batch_size: int,
              **model) -> ml_collections.ConfigDict:
  """The `:bench` run: benchmarks/train_throughput.py's model and batch shapes (no
  dropout, vocabulary 8192, AdamW lr 1e-4), logging every 10 steps and evaluating only
  at the end, so the CLI's tokens/s can be compared with the bare train step's
  (benchmarks/loop_vs_step.py)."""
  c.model.update(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                 num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                 max_position_embeddings=max_seq_len, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, **model)
  c.tokenizer.vocab_size = 8192
  c.data.max_seq_len = max_seq_len
  c.train.update(steps=100, batch_size=batch_size, learning_rate=1e-4, warmup_steps=0,
                 decay="constant", weight_decay=0.01, grad_clip_norm=1.0, log_every=10,
                 eval_every=100)
  c.eval.update(max_batches=2, samples=1, fill_mask_examples=1)
  c.checkpoint.every = 100
  return c


def tiny_run(c) -> ml_collections.ConfigDict:
  """The `:tiny` run shared by the decoder and encoder-decoder configs: seconds on a CPU,
  and one prepared corpus (same data and tokenizer settings) serves all of them."""
  c.tokenizer.vocab_size = 1024
  c.data.max_seq_len = 64
  c.train.update(steps=80, batch_size=16, learning_rate=5e-3, warmup_steps=5,
                 decay="cosine", end_learning_rate_factor=0.1, eval_every=40, log_every=20)
  c.eval.update(batch_size=32, max_batches=2, samples=2, sample_prompt_tokens=8,
                sample_new_tokens=16)
  c.checkpoint.every = 40
  return c


def finetune_run(c, *, objective: str, dataset: str, steps: int, learning_rate: float,
                 metric: str, eval_every: int) -> ml_collections.ConfigDict:
  """The fine-tuning configs' recipe: from the main job's export (runs/default), bf16
  matmuls, 128-token rows of 32, linear decay, early stopping and keep_best on `metric`."""
  c.model.init_from = "runs/default"
  c.model.update(dtype="bfloat16")
  c.train.objective = objective
  c.finetune.dataset = dataset
  c.data.max_seq_len = 128
  c.train.update(steps=steps, batch_size=32, learning_rate=learning_rate,
                 warmup_steps=steps // 10, decay="linear", eval_every=eval_every, log_every=50,
                 early_stopping_metric=metric, keep_best=True)
  c.eval.batch_size = 128
  c.checkpoint.every = eval_every
  return c


def finetune_tiny(c) -> ml_collections.ConfigDict:
  """The fine-tuning configs' `:tiny` run: a few steps, two small eval batches."""
  c.train.update(steps=6, batch_size=8, warmup_steps=1, eval_every=3, log_every=3)
  c.eval.update(batch_size=32, max_batches=2)
  c.checkpoint.every = 3
  c.finetune.generate_examples = 8
  return c
