"""What the tests share: repository paths, the committed Hugging Face fixtures and one
prepared tiny corpus.

Every `:tiny` config (configs/*.py) prepares the embedded corpus with the same data and
tokenizer settings, so one session-wide copy serves all of them: a test copies it into
its workdir (`fresh_workdir`) instead of preparing it again.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")  # tiny HF checkpoints, one per family

if str(REPO) not in sys.path:  # `from configs import ...` however pytest is started
  sys.path.insert(0, str(REPO))


def fixture(name: str) -> str:
  """The directory of the committed HF fixture `name` (tests/fixtures/hf/<name>)."""
  return os.path.join(FIXTURES, name)


def assert_hf_config_refused(tmp_path: Path, name: str, edit, needle: str) -> None:
  """Fixture `name` with its config.json passed through `edit` is refused with a one-line
  ConfigError matching `needle`: by its family's config_from_hf and by from_pretrained."""
  import json  # noqa: PLC0415 (jaxlm only for the tests that use it)

  import jaxlm  # noqa: PLC0415
  from jaxlm.hf import family_of, read_hf_config  # noqa: PLC0415

  raw = read_hf_config(fixture(name))
  with pytest.raises(jaxlm.ConfigError, match=needle) as e:
    family_of(raw["architectures"][0], "test").config_from_hf(edit(raw))
  assert "\n" not in str(e.value)
  d = tmp_path / name
  shutil.copytree(fixture(name), d)
  (d / "config.json").write_text(json.dumps(edit(read_hf_config(str(d)))))
  with pytest.raises(jaxlm.ConfigError, match=needle):
    jaxlm.from_pretrained(str(d))


def quiet(_msg: str) -> None:
  """A `log=` callback that prints nothing."""


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
  """The embedded corpus as every `:tiny` config prepares it, prepared once."""
  from configs import default  # noqa: PLC0415

  from jaxlm.data.corpus import prepare_corpus  # noqa: PLC0415
  cfg = default.get_config("tiny")
  path = tmp_path_factory.mktemp("corpus") / "data"
  prepare_corpus(cfg.data, cfg.tokenizer, str(path), log=quiet)
  return path


def fresh_workdir(tmp_path: Path, tiny_corpus: Path, name: str = "run") -> Path:
  """A new workdir under `tmp_path` holding a copy of the prepared tiny corpus."""
  wd = tmp_path / name
  shutil.copytree(tiny_corpus, wd / "data")
  return wd


def dot_operand_types(fn, *args) -> list[str]:
  """Element types of the first operand of every dot in `fn`'s lowered StableHLO ("bf16",
  "f32", ...): proof that a precision setting reached the compiled program."""
  import jax  # noqa: PLC0415
  return dot_types_in(jax.jit(fn).lower(*args).as_text())


def dot_types_in(stablehlo: str) -> list[str]:
  """Element types of the first operand of every dot in a lowered program's text."""
  return re.findall(r"dot_general[^\n]*?: \(tensor<[0-9x]*(\w+)>", stablehlo)


def pallas_vs_xla(cfg, params, name: str, *, grads: bool = True
                  ) -> tuple[float, float, bool, float]:
  """The model `cfg` with `params` (nnx.Param state) run on the inputs of fixture `name`
  with attention_impl "xla" and "pallas" (interpret mode on CPU): (largest error of the
  real positions' logits, of any gradient of a weighted logits sum; both relative to
  max(1, |xla|)), whether every xla gradient is live, and the largest gradient error
  relative to max(1, its leaf's largest |xla| entry). `grads=False`: logits only (the
  gradient entries are then 0.0, True, 0.0)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from jaxlm import Runtime  # noqa: PLC0415
  from jaxlm.models import auto  # noqa: PLC0415
  inputs = dict(np.load(os.path.join(fixture(name), "inputs.npz")))
  ids = jnp.asarray(inputs["input_ids"], jnp.int32)
  mask = jnp.asarray(inputs["attention_mask"], jnp.int32)
  real = mask.astype(jnp.float32)
  w = jax.random.normal(jax.random.key(0), (cfg.vocab_size,))

  def run(impl):
    model = auto.build_abstract_model(cfg, runtime=Runtime(attention_impl=impl))
    nnx.update(model, params)
    graphdef, p0 = nnx.split(model, nnx.Param)

    def f(p):
      logits = nnx.merge(graphdef, p)(ids, mask).logits
      return (logits * real[..., None] * w).sum() / real.sum(), logits
    if not grads:
      return np.asarray(jax.jit(f)(p0)[1]), []
    (_, logits), g = jax.jit(jax.value_and_grad(f, has_aux=True))(p0)
    return np.asarray(logits), [np.asarray(x) for x in jax.tree.leaves(g)]

  want, want_g = run("xla")
  got, got_g = run("pallas")
  on = np.asarray(mask, bool)

  def err(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))

  return (err(got[on], want[on]), max((err(a, b) for a, b in zip(got_g, want_g)), default=0.0),
          all(float(np.abs(g).sum()) > 0 for g in want_g),
          max((float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))
               for a, b in zip(got_g, want_g)), default=0.0))
