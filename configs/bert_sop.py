"""The main job's BERT (configs/default.py) pretrained ALBERT-style: masked LM plus
sentence-order prediction (train.objective="sop", jaxlm/tasks/sop.py) instead of NSP.

  python -m jaxlm.main --config=configs/bert_sop.py --workdir=runs/bert_sop

Same model, data, tokenizer and budget as the main job, so its MLM numbers compare
directly; `configs/bert_sop.py:tiny` is the seconds-long smoke run.
"""

import importlib.util
import os


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
  spec = importlib.util.spec_from_file_location("default", path)
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  c = default.get_config(arg)
  c.train.objective = "sop"
  c.eval.samples = 3  # sentence-order pairs shown in the report
  return c
