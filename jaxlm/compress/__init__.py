"""Model compression: weight-only quantization (quantize.py), pruning (prune.py) with
mask-keeping recovery (recover.py). Distillation is a task (jaxlm/tasks/distill.py), and
speculative decoding lives with generation (jaxlm/generate/speculative.py). Only the
quantizer is imported here: jaxlm.pretrained loads quantized exports through it, and
prune/recover pull in the training stack (`jaxlm.prune` imports them on use)."""

from jaxlm.compress.quantize import QuantConfig, QuantDense, QuantEmbed, quantize

__all__ = ["QuantConfig", "QuantDense", "QuantEmbed", "quantize"]
