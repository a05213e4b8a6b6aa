"""A toy Mixtral (2 layers, 64 wide, 4 SwiGLU experts with top-2 routing) as a causal LM
on the embedded corpus, in seconds on a CPU: `configs/mixtral_8x7b.py:tiny` under its own
name.

  python -m jaxlm.main --config=configs/mixtral_tiny.py --workdir=runs/mixtral_tiny
"""

import importlib.util
import os


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/mixtral_tiny.py takes no variant, got {arg!r}")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mixtral_8x7b.py")
  spec = importlib.util.spec_from_file_location("mixtral_8x7b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")
