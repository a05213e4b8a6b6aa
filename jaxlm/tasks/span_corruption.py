"""`span_corruption`: T5's denoising objective (encoder-decoder models). Random spans
(15% of tokens, mean length 3) of a packed row are replaced by sentinels in the encoder
input; the decoder predicts the dropped spans behind their sentinels. Its report shows a
few corrupted test inputs with the target spans and the model's greedy guess."""

from __future__ import annotations

from typing import Any

from jaxlm.data import pipeline
from jaxlm.data.objectives import span_counts
from jaxlm.errors import ConfigError
from jaxlm.generate.decode import generate
from jaxlm.tasks.base import register
from jaxlm.tasks.causal import TokenPrediction


@register
class SpanCorruption(TokenPrediction):
  name = "span_corruption"
  architectures = ("T5ForConditionalGeneration",)
  model_kind = "an encoder-decoder model"

  def validate(self, cfg):
    d = cfg.data
    spans = span_counts(d.max_seq_len * 2, d.noise_density, d.mean_noise_span_length)[1]
    if d.num_sentinels < spans:
      raise ConfigError(f"data.num_sentinels ({d.num_sentinels}) is below the number of noise "
                        f"spans a row can have (up to {spans} at data.max_seq_len="
                        f"{d.max_seq_len})")

  def model_ids(self, tokenizer, data_cfg):
    return pipeline.span_model_ids(tokenizer, data_cfg.num_sentinels)

  def examples(self, corpus, split, data_cfg, seed):
    return pipeline.span_examples(corpus, split, data_cfg, seed)

  def stats(self, model, batch, rngs=None):
    out = model(batch["input_ids"], batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"],
                decoder_attention_mask=batch["decoder_attention_mask"], project_logits=False,
                rngs=rngs)
    return self.lm_stats(model, out, batch)

  def samples(self, model, corpus, evaluator, cfg):
    return {"samples": span_samples(
        model, corpus, evaluator.batches("test")[0], cfg.eval.samples,
        pipeline.sentinel_ids(corpus.tokenizer, cfg.data.num_sentinels))}


# ---- span reconstructions for the report ------------------------------------------------
def _span_text(ids, tok, sentinels, eos: int | None = None) -> str:
  """Text with sentinel ids spelled <extra_id_i> (they may lie past the tokenizer's
  vocabulary), cut at the first `eos` if given."""
  names = {int(s): f"<extra_id_{i}>" for i, s in enumerate(sentinels)}
  parts, run = [], []
  for i in (int(x) for x in ids):
    if i == eos:
      break
    if i in names:
      parts += [tok.decode(run), names[i]] if run else [names[i]]
      run = []
    else:
      run.append(i)
  if run:
    parts.append(tok.decode(run))
  return " ".join(p for p in parts if p)


def span_samples(model, corpus, batch, n: int, sentinels) -> list[dict[str, Any]]:
  """The first `n` examples of a span-corruption batch: corrupted input, target spans and
  the model's greedy guess at them."""
  if n < 1:
    return []
  batch = {k: v[:n] for k, v in batch.items()}
  cfg, tok = model.config, corpus.tokenizer
  pred = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                  max_new_tokens=batch["targets"].shape[1], eos_token_id=cfg.eos_token_id)[:, 1:]
  # Packed rows keep their end-of-document tokens (the same id as the final eos), so the
  # inputs and targets are cut by their masks; the model's guess at its first eos.
  n_in, n_out = batch["attention_mask"].sum(1) - 1, batch["loss_weights"].sum(1).astype(int) - 1
  return [{"input": _span_text(batch["input_ids"][i, :n_in[i]], tok, sentinels),
           "target": _span_text(batch["targets"][i, :n_out[i]], tok, sentinels),
           "prediction": _span_text(pred[i], tok, sentinels, cfg.eos_token_id)}
          for i in range(len(pred))]
