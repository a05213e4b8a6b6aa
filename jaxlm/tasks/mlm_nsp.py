"""`mlm+nsp`: BERT's original pretraining, masked LM and next-sentence prediction from
one forward pass, their losses added. The report fills masked words."""

from __future__ import annotations

from jaxlm.tasks.base import register
from jaxlm.tasks.mlm import MaskedLM
from jaxlm.tasks.nsp import PairClassification


@register
class MLMNSP(PairClassification):
  name = "mlm+nsp"
  mlm = True

  def samples(self, model, corpus, evaluator, cfg):
    return MaskedLM.samples(self, model, corpus, evaluator, cfg)  # fill-mask only
