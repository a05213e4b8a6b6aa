"""What the fine-tuning tasks (classify, token_classify, extractive_qa, sft) share: they
start from a pretrained model (`model.init_from`), read labeled data
(`jaxlm.data.labeled`) instead of a pretraining corpus, and put a head on the model
(`head_config`: the Hugging Face class with that head, e.g. BertForSequenceClassification
for a BERT checkpoint). jaxlm/train/finetune.py loads the weights into it."""

from __future__ import annotations

from typing import Any, ClassVar

import grain
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.data import labeled, pipeline
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError
from jaxlm.pretrained import resolve_dir
from jaxlm.tasks.base import Task


class FineTuneTask(Task):
  """A task that adapts a pretrained model to labeled data."""

  finetune = True
  # model_type -> the Hugging Face class with this task's head.
  heads: ClassVar[dict[str, str]] = {}
  dataset_fields: ClassVar[tuple[str, ...]] = ()  # JSONL keys a record needs

  def check_model(self, model: ModelConfig, source: str) -> None:
    if model.model_type not in self.heads and (model.architectures or [""])[0] not in \
        self.heads.values():
      raise ConfigError(f"train.objective={self.name!r} has heads for "
                        f"{sorted(self.heads)} models, but {source} is {model.model_type!r}")

  def validate(self, cfg) -> None:
    if not cfg.model.init_from:
      raise ConfigError(f"train.objective={self.name!r} fine-tunes a pretrained model: set "
                        "model.init_from (a jaxlm workdir or export, or a Hugging Face dir)")
    f = cfg.finetune
    if not f.dataset and cfg.data.source == "embedded":
      raise ConfigError("finetune.dataset: name an embedded task "
                        f"({', '.join(labeled.EMBEDDED_DATASETS)}) or set data.source to a "
                        "JSONL file")

  def head_config(self, pretrained: ModelConfig, data: labeled.LabeledData) -> ModelConfig:
    """The fine-tuned model's config: the pretrained one with this task's head."""
    arch = self.heads.get(pretrained.model_type)
    if arch is None:
      raise ConfigError(f"train.objective={self.name!r}: no head for model_type "
                        f"{pretrained.model_type!r} (have {sorted(self.heads)})")
    return pretrained.replace(architectures=[arch])

  # ---- data -------------------------------------------------------------------------
  def prepare_data(self, cfg, tok_cfg, directory: str, log) -> labeled.LabeledData:
    tok = Tokenizer.load(resolve_dir(cfg.model.init_from))
    if cfg.finetune.dataset:
      data = labeled.embedded(cfg.finetune.dataset, tok, max_seq_len=cfg.data.max_seq_len,
                              seed=cfg.seed)
    else:
      data = self.from_jsonl(cfg, tok)
    sizes = {s: len(r) for s, r in data.records.items()}
    for split, n in sizes.items():
      if n == 0:
        raise ConfigError(f"data: the {split} split of {cfg.finetune.dataset or cfg.data.source}"
                          " has no examples")
    data.manifest["examples"] = sizes
    log(f"data: {cfg.finetune.dataset or cfg.data.source}: " +
        ", ".join(f"{s} {n}" for s, n in sizes.items()) + " examples")
    return data

  def from_jsonl(self, cfg, tok: Tokenizer) -> labeled.LabeledData:
    raise ConfigError(f"train.objective={self.name!r} reads no JSONL files; set "
                      "finetune.dataset")

  def rows(self, data, split: str, fn) -> pipeline.Examples:
    return pipeline.Examples(source(data.records[split]), fn, False)

  def vocab_positions_fraction(self, data_cfg) -> float:
    return 0.0  # a head, no vocabulary projection

  def unigram_log_probs(self, corpus, vocab_size: int):
    return None  # baselines come from `baseline_sums`

  def baseline_sums(self, data, batch) -> dict[str, float]:
    """Host-side sums of the task's baseline on one eval batch (added to the sums)."""
    return {}


def source(items: list) -> grain.MapDataset:
  return grain.MapDataset.source(_Records(items))


class _Records:
  """A list of records as a grain source (grain wants __len__ and __getitem__)."""

  def __init__(self, records: list[dict[str, Any]]):
    self.records = records

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.records[i]


def encoder_row(first: list[int], second: list[int] | None, tok: Tokenizer, max_len: int,
                pad: int) -> dict[str, np.ndarray]:
  """[CLS] first [SEP] (second [SEP]) padded to max_len, with token types and mask."""
  ids = [tok.cls_id, *first, tok.sep_id]
  types = [0] * len(ids)
  if second is not None:
    ids += [*second, tok.sep_id]
    types += [1] * (len(second) + 1)
  ids, types = ids[:max_len], types[:max_len]
  n = len(ids)
  out = {"input_ids": np.full(max_len, pad, np.int32), "token_type_ids": np.zeros(max_len, np.int32),
         "attention_mask": np.zeros(max_len, np.int32)}
  out["input_ids"][:n], out["token_type_ids"][:n], out["attention_mask"][:n] = ids, types, 1
  return out


def decoder_row(ids: list[int], max_len: int, pad: int) -> dict[str, np.ndarray]:
  """Right-padded ids (transformers pools a decoder at the last non-pad token)."""
  ids = ids[:max_len]
  row = np.full(max_len, pad, np.int32)
  row[:len(ids)] = ids
  mask = np.zeros(max_len, np.int32)
  mask[:len(ids)] = 1
  return {"input_ids": row, "attention_mask": mask}
