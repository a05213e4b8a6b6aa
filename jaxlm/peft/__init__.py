"""Parameter-efficient fine-tuning: LoRA by module swap on nnx.LoRA (see peft/lora.py)."""

from jaxlm.peft.lora import (
  LoRAConfig,
  LoRADense,
  apply_lora,
  count_params,
  load_adapters,
  lora_dropout,
  lora_modules,
  merge_lora,
  read_adapter_config,
  save_adapters,
  trainable_filter,
)

__all__ = ["LoRAConfig", "LoRADense", "apply_lora", "count_params", "load_adapters",
           "lora_dropout", "lora_modules", "merge_lora", "read_adapter_config", "save_adapters",
           "trainable_filter"]
