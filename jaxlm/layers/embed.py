"""Token embedding table that can also project back to the vocabulary (tied heads)."""

import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.linear import normal_init
from jaxlm.layers.vocab_loss import Projection


class Embed(nnx.Module):

  def __init__(self, num_embeddings: int, features: int, *, init_std: float = 0.02,
               axes: tuple = ("vocab", "embed"), dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.embedding = nnx.Param(normal_init(init_std)(rngs.params(), (num_embeddings, features),
                                                     param_dtype), axes=tuple(axes))
    self.dtype = dtype

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0).astype(jnp.float32)

  def projection(self, x_BTD) -> Projection:
    """The tied vocabulary projection x @ E^T, not yet computed."""
    return Projection(x_BTD, self.embedding[...], vocab_major=True, dtype=self.dtype)

  def attend(self, x_BTD):
    """Logits against every embedding row: x @ E^T."""
    return self.projection(x_BTD).logits()
