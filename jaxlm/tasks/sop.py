"""`sop`: ALBERT's sentence-order prediction, trained with masked LM as ALBERT does.
Each example is two consecutive segments of one document, A then B; half of the time
they are swapped, and the pair head says whether they are in order. Unlike NSP, both
segments always come from the same document, so topic alone cannot give the answer.

This module is also the worked example of adding a task: a pair builder that overrides
`pipeline.BertPairs.pair`, and a `PairClassification` subclass naming it.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data import pipeline
from jaxlm.tasks.base import register
from jaxlm.tasks.nsp import PairClassification


class SentenceOrderPairs(pipeline.BertPairs):
  """(A, B, in_order): B is what follows A in its document; swapped half of the time."""

  label_key = "sop"

  def pair(self, a: list[int], cut: int, doc: int, budget: int, rng: np.random.Generator):
    b = self._run(cut, doc, budget - len(a)) or [self.sp.sep]
    in_order = int(rng.random() < 0.5)
    return (a, b, in_order) if in_order else (b, a, in_order)


@register
class SOP(PairClassification):
  name = "sop"
  key = "sop"
  question = "A comes before B"
  mlm = True
  builder = SentenceOrderPairs
