"""Token embedding table that can also project back to the vocabulary (tied heads)."""

import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.linear import normal_init
from jaxlm.layers.vocab_loss import Projection


def scaled(x, scale: float | None, dtype):
  """Looked-up embeddings x (float32) times `scale`. The constant is rounded to the compute
  dtype first, as Gemma does (sqrt(3072) is 55.43 in float32 but 55.5 in bfloat16), so a
  bf16 run multiplies by what the checkpoint was trained with."""
  x = x.astype(jnp.float32)
  return x if scale is None else x * jnp.asarray(scale, dtype).astype(jnp.float32)


class Embed(nnx.Module):
  """`scale` multiplies the looked-up vectors (not the tied head): Gemma's sqrt(D)."""

  def __init__(self, num_embeddings: int, features: int, *, init_std: float = 0.02,
               axes: tuple = ("vocab", "embed"), scale: float | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.embedding = nnx.Param(normal_init(init_std)(rngs.params(), (num_embeddings, features),
                                                     param_dtype), axes=tuple(axes))
    self.dtype = dtype
    self.scale = scale

  def __call__(self, ids):
    return scaled(jnp.take(self.embedding[...], ids, axis=0), self.scale, self.dtype)

  def projection(self, x_BTD) -> Projection:
    """The tied vocabulary projection x @ E^T, not yet computed."""
    return Projection(x_BTD, self.embedding[...], vocab_major=True, dtype=self.dtype)

  def attend(self, x_BTD):
    """Logits against every embedding row: x @ E^T."""
    return self.projection(x_BTD).logits()
