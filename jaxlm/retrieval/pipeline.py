"""Retrieve, build the prompt, generate: `Pipeline(retriever, generator, tokenizer,
template).answer(question)`.

  rag = Pipeline(BM25Retriever.load("runs/idx"), jaxlm.from_pretrained("runs/lm/model"),
                 jaxlm.load_tokenizer("runs/lm/model"), Template(), k=4)
  a = rag.answer("Now is the winter of our discontent")
  a.text, a.passages                # the generated answer; ids of the passages it was given

The passages are the retriever's indexed texts (`retriever.texts`) unless given. The
prompt is fitted to the generator's context less `max_new_tokens` (prompt.fit_prompt), so
the lowest-ranked passages are the ones left out; the generator sees the prompt and "\n",
as the SFT task trains it, and answers up to its end token (or `stop`). `k=0` (or
`retrieve=False` per call) answers from the question alone, through the same template
with an empty context: the baseline that shows what retrieval adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxlm.data.pipeline import end_of_document_id
from jaxlm.errors import ConfigError
from jaxlm.generate.text import complete
from jaxlm.retrieval.prompt import Template, fit_prompt


@dataclasses.dataclass(frozen=True)
class Answer:
  text: str
  passages: tuple[int, ...]  # ids (positions in the index) of the passages in the prompt
  prompt: str


class Pipeline:
  def __init__(self, retriever, generator, tokenizer, template: Template | None = None, *,
               passages: Sequence[str] | None = None, k: int = 4, max_new_tokens: int = 32,
               stop: str | None = None, **sampling):
    """`stop`: the answer is cut at the first occurrence of this string (e.g. "\\n");
    `sampling`: generate's keyword arguments (temperature, top_p, seed, ...)."""
    self.retriever, self.generator, self.tokenizer = retriever, generator, tokenizer
    self.template = template or Template()
    self.passages = passages if passages is not None else getattr(retriever, "texts", None)
    if k and self.passages is None:
      raise ConfigError("Pipeline: the retriever keeps no texts; pass passages=[...] (the "
                        "texts it indexed, in order)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise ConfigError(f"Pipeline: k must be a non-negative integer, got {k!r}")
    self.k, self.max_new_tokens, self.stop, self.sampling = k, max_new_tokens, stop, sampling
    window = generator.config.max_position_embeddings
    self.budget = window - max_new_tokens  # prompt tokens, with the "\n" complete() adds
    self.eos = end_of_document_id(tokenizer)
    if self.budget < 2:
      raise ConfigError(f"Pipeline: max_new_tokens={max_new_tokens} leaves no room for a "
                        f"prompt in the generator's {window}-token context")

  def prompts(self, questions: Sequence[str], retrieve: bool = True):
    """The fitted prompt of each question, and the passage ids it holds."""
    if retrieve and self.k:
      ids_QK, _ = self.retriever.search(list(questions), self.k)
      ids_QK = np.asarray(ids_QK)
    else:
      ids_QK = np.zeros((len(questions), 0), np.int64)
    out = []
    for q, ids in zip(questions, ids_QK):
      ids = [int(i) for i in ids if i >= 0]
      p = fit_prompt(self.template, q, [self.passages[i] for i in ids], self.tokenizer,
                     self.budget - 1)
      out.append((p.text, tuple(ids[r] for r in p.passages)))
    return out

  def answer_batch(self, questions: Sequence[str], retrieve: bool = True, *,
                   batch_size: int = 32) -> list[Answer]:
    """Answers to several questions, generated in left-padded batches of one shape."""
    prompts = self.prompts(questions, retrieve)
    replies = complete(self.generator, self.tokenizer, [text for text, _ in prompts],
                       eos=self.eos, max_new_tokens=self.max_new_tokens,
                       max_prompt=self.budget, batch_size=min(batch_size, len(prompts)),
                       **self.sampling)
    answers = []
    for (text, used), reply in zip(prompts, replies):
      if self.stop and self.stop in reply:
        reply = reply[:reply.index(self.stop)]
      answers.append(Answer(reply.strip(), used, text))
    return answers

  def answer(self, question: str, retrieve: bool = True) -> Answer:
    return self.answer_batch([question], retrieve)[0]
