"""Activation functions by their Hugging Face names."""

import math

import jax
import jax.numpy as jnp


def _gelu_new(x):
  # GPT-2 / BERT-original tanh approximation.
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_new,
    "gelu_fast": _gelu_new,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def softcap(x, cap: float | None):
  """cap * tanh(x / cap): squashes logits smoothly into (-cap, cap) (Gemma 2's attention
  and final logits); identity for cap None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def get_activation(name: str):
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
