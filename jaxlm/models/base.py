"""Base class for top-level models: a `config` and `save_pretrained`."""

from flax import nnx


class PreTrainedModel(nnx.Module):
  """Top-level models subclass this and set `self.config` (a ModelConfig)."""

  def save_pretrained(self, directory: str) -> None:
    from jaxlm.models.auto import save_pretrained  # auto imports the model modules
    save_pretrained(self, directory)
