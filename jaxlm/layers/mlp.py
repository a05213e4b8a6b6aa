"""Feed-forward blocks: plain (BERT/GPT: up -> act -> down) and gated (SwiGLU/GeGLU)."""

import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.activations import get_activation
from jaxlm.layers.linear import Dense
from jaxlm.parallel.rules import constrain


class MLP(nnx.Module):

  def __init__(self, hidden_size: int, intermediate_size: int, *, activation: str = "gelu",
               gated: bool = False, use_bias: bool = True, init_std: float = 0.02,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, init_std=init_std, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.up = Dense(hidden_size, intermediate_size, axes=("embed", "mlp"), **kw)
    self.gate = (Dense(hidden_size, intermediate_size, axes=("embed", "mlp"), **kw)
                 if gated else None)
    self.down = Dense(intermediate_size, hidden_size, axes=("mlp", "embed"), **kw)
    self.act = get_activation(activation)

  def __call__(self, x_BTD):
    if self.gate is not None:
      h_BTF = self.act(self.gate(x_BTD)) * self.up(x_BTD)
    else:
      h_BTF = self.act(self.up(x_BTD))
    return self.down(constrain(h_BTF, ("batch", "length", "mlp")))
