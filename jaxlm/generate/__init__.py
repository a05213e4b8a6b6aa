"""Text generation with a KV cache: `generate` (one compiled prefill + decode loop) and
`stream` (the same steps, yielding tokens as they come); sampling filters in sampling.py."""

from jaxlm.generate.decode import generate, stream
from jaxlm.generate.sampling import Sampling

__all__ = ["Sampling", "generate", "stream"]
