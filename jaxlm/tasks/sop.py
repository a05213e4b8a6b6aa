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
  """(A, B, in_order): B is the whole lines that follow A in its document (as many as
  fit); swapped half of the time.

  B ends at a line end, as A does: a B cut mid-line would tell the order by itself
  (the segment that stops mid-line would always be the second one in order).
  """

  label_key = "sop"

  def pair(self, a: list[int], cut: int, doc: int, budget: int, rng: np.random.Generator):
    s, room = self.split, budget - len(a)
    offsets = s.line_offsets
    doc_end = int(s.doc_lines[doc + 1])
    first = int(np.searchsorted(offsets, cut, side="right"))  # offsets[first]: next line end
    j = first
    while j <= doc_end and offsets[j] - cut <= room:
      j += 1  # the line ending at offsets[j] fits whole
    # Whole lines when at least one fits, else the first line cut to the room left.
    end = int(offsets[j - 1]) if j > first else min(int(offsets[first]), cut + room)
    b = s.tokens[cut:end].astype(np.int64).tolist() or [self.sp.sep]
    in_order = int(rng.random() < 0.5)
    return (a, b, in_order) if in_order else (b, a, in_order)


@register
class SOP(PairClassification):
  name = "sop"
  key = "sop"
  question = "A comes before B"
  mlm = True
  builder = SentenceOrderPairs
