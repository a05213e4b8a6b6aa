"""Model report: python -m jaxlm.report --config=configs/X.py[:variant] | --hf=DIR

  [--config.a.b=value ...] [--mesh=data=2,fsdp=4] [--device cpu|h100|h200|tpu-v5e|
  tpu-v5p|tpu-v6e] [--seq_len N] [--batch N] [--quantize int8|int4|bf16 [--group_size G]]
  [--json]

Prints parameters (total, embedding, non-embedding, active per token for MoE), training
FLOPs per token (MaxText's accounting), training memory per device on the mesh,
inference memory (weights, KV cache), parameter bytes per dtype as stored (a quantized
export's codes and scales) and, with --quantize, after weight-only quantization
(jaxlm.quantize), and a roofline step time for the device. Nothing
is allocated: the model is built abstractly. How each number is counted:
`jaxlm/analysis.py`. The vocabulary is the config's model.vocab_size (a run from scratch
resizes it to the trained tokenizer; set --config.model.vocab_size to match).

Thin on purpose, like jaxlm.main: bad input prints one `error:` line and exits 2.
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlm.cli import fail as _fail
from jaxlm.cli import one_line as _one_line
from jaxlm.cli import parse_flags
from jaxlm.errors import JaxlmError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (.py).")
_HF = flags.DEFINE_string("hf", None, "A model directory (Hugging Face or jaxlm export).")
_MESH = flags.DEFINE_string("mesh", None, "Mesh sizes, e.g. data=2,fsdp=4 (unnamed axes: 1). "
                            "Default: the config's mesh section (-1 read as 1).")
_DEVICE = flags.DEFINE_string("device", "cpu", "cpu (peak measured here), h100, h200, "
                              "tpu-v5e, tpu-v5p or tpu-v6e.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default: data.max_seq_len;"
                                " 2048 with --hf, capped at the context).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch in sequences (default: "
                              "train.batch_size; 8 with --hf).")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
_QUANTIZE = flags.DEFINE_string("quantize", None, "int8, int4 or bf16: also count the "
                                "parameter bytes after weight-only quantization.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 128, "int4 group size for --quantize.")


def parse_mesh(text: str) -> dict[str, int]:
  from jaxlm.parallel.mesh import MESH_AXES
  sizes = dict.fromkeys(MESH_AXES, 1)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES:
      raise ValueError(f"--mesh: {part!r} is not AXIS=SIZE with AXIS one of {MESH_AXES}")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh: {name} size {value!r} is not an integer") from None
    if sizes[name] <= 0:
      raise ValueError(f"--mesh: {name} size must be positive, got {sizes[name]}")
  return sizes


def _hf_model_config(directory: str):
  """The ModelConfig `jaxlm.from_pretrained` would build, without reading the weights."""
  from jaxlm.errors import DataError
  from jaxlm.pretrained import load_config
  if not os.path.isdir(directory):
    raise DataError(f"--hf: {directory}: no such model directory")
  return load_config(directory)[0]


def parameter_bytes(mc, rt, stored=None, mode: str | None = None,
                    group_size: int = 128) -> dict:
  """{"stored": bytes per dtype of the model as built (quantized as `stored`, a
  QuantConfig, says), mode: the same after jaxlm.quantize(mode)}, from abstract models."""
  import dataclasses

  from flax import nnx

  from jaxlm.compress.quantize import param_bytes, quantize
  from jaxlm.models import auto

  def counted(**q):
    return param_bytes(nnx.eval_shape(
        lambda: quantize(auto.build_model(mc, runtime=rt), **q) if q
        else auto.build_model(mc, runtime=rt)))
  out = {"stored": counted(**(dataclasses.asdict(stored) if stored else {}))}
  if mode:
    out[mode] = counted(mode=mode, group_size=group_size)
  return out


def build(cfg, hf_dir, mesh_text, device, seq_len, batch, quantize: str | None = None,
          group_size: int = 128) -> dict:
  """The report dict (analysis.report) for a config or an HF directory."""
  from jaxlm import analysis, experiment
  from jaxlm.config import Runtime
  from jaxlm.models import auto
  from jaxlm.parallel.mesh import mesh_shape
  from jaxlm.parallel.rules import DEFAULT_RULES
  if device not in analysis.DEVICE_CHOICES:
    raise ValueError(f"--device: unknown device {device!r}; choose one of "
                     f"{', '.join(analysis.DEVICE_CHOICES)}")
  grad_accum, optimizer, rt = 1, "adamw", Runtime()
  if hf_dir is not None:
    mc = _hf_model_config(hf_dir)
    rules, mesh = DEFAULT_RULES, dict(data=1, fsdp=1, tensor=1, expert=1)
    seq_len = seq_len or min(2048, mc.max_position_embeddings)
    batch = batch or 8
  else:
    mc, rt = experiment.model_config(cfg), experiment.runtime(cfg)
    rules = tuple(cfg.mesh.rules)
    mesh = {a: (1 if int(cfg.mesh[a]) == -1 else int(cfg.mesh[a])) for a in cfg.mesh
            if a != "rules"}
    mesh = mesh_shape(mesh, max(1, abs(_prod(mesh.values()))))
    seq_len = seq_len or cfg.data.max_seq_len
    batch = batch or cfg.train.batch_size
    grad_accum, optimizer = cfg.train.grad_accum_steps, cfg.train.optimizer
  if mesh_text:
    mesh = parse_mesh(mesh_text)
  if seq_len <= 0 or batch <= 0:
    raise ValueError("--seq_len and --batch must be positive")
  rows = analysis.param_table(auto.build_abstract_model(mc, runtime=rt))
  spec = analysis.device_spec(device, "float32" if rt.dtype == "float32" else "bfloat16")
  out = analysis.report(mc, rows, rules=rules, mesh=mesh, seq_len=seq_len, batch=batch,
                        device=spec, grad_accum=grad_accum, optimizer=optimizer, runtime=rt)
  from jaxlm.pretrained import read_quantization
  stored = read_quantization(hf_dir) if hf_dir is not None else None
  out["parameter_bytes"] = parameter_bytes(mc, rt, stored, quantize, group_size)
  out["source"] = hf_dir if hf_dir is not None else "config"
  return out


def _prod(values):
  n = 1
  for v in values:
    n *= v
  return n


def _n(x: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3f}{unit}"
  return f"{x:.0f}"


def _b(x: float) -> str:
  for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {unit}"
  return f"{x:.0f} B"


def format_table(r: dict) -> str:
  m, p, f = r["model"], r["parameters"], r["training_flops_per_token"]
  mem, inf, roof, run = (r["training_memory_per_device"], r["inference_memory"],
                         r["roofline"], r["run"])
  dev = roof["device"]
  mesh = " x ".join(f"{k}={v}" for k, v in run["mesh"].items())
  lines = [
      f"model        {m['architecture']}: L={m['layers']} D={m['hidden_size']} "
      f"H={m['heads']}/{m['kv_heads']}kv hd={m['head_size']} F={m['intermediate_size']} "
      f"V={m['vocab_size']}" + (f" E={m['experts']}" if m["experts"] else "")
      + f"  dtype={m['dtype']} params={m['param_dtype']} remat={m['remat']}",
      f"run          T={run['seq_len']} batch={run['batch']} mesh {mesh} "
      f"({run['num_devices']} devices)",
      "",
      "parameters",
      f"  total                 {p['total']:>16,}  ({_n(p['total'])})",
      f"  embedding             {p['embedding']:>16,}  (token + position tables)",
      f"  non-embedding         {p['non_embedding']:>16,}",
  ]
  if p["lm_head"]:
    lines.append(f"    of which lm_head    {p['lm_head']:>16,}  (untied)")
  if p["experts"]:
    lines += [f"  experts               {p['experts']:>16,}",
              f"  active per token      {p['active']:>16,}  "
              f"(non-embedding {p['active_non_embedding']:,})"]
  lines += [
      f"  closed form check     {'matches' if p['closed_form_matches'] else 'MISMATCH'}",
      "",
      "training FLOPs per token (MaxText accounting, causal attention halved)",
      f"  weights  6 x {_n(f['weight_params'])}      {_n(f['weights'])}",
      f"  attention             {_n(f['attention'])}",
      f"  total                 {_n(f['total'])}",
      "",
      f"training memory per device (adamw state in {m['param_dtype']}; "
      f"{mem['sequences_per_device']:g} sequences/device)",
      f"  params per device     {_n(mem['params_per_device'])}",
      f"  params                {_b(mem['params'])}",
      f"  grads                 {_b(mem['grads'])}",
      f"  optimizer moments     {_b(mem['optimizer'])}",
      f"  activations (~)       {_b(mem['activations'])}  (remat={m['remat']})",
      f"  total                 {_b(mem['total'])}"
      + (f"  ({'fits' if mem['total'] <= dev['hbm_bytes'] else 'does NOT fit'} in "
         f"{dev['hbm_bytes'] / 1e9:.0f} GB)" if dev.get("hbm_bytes") else ""),
      "",
      "inference memory",
      "  weights               " + "  ".join(f"{k} {_b(v)}" for k, v in inf["weights"].items()),
  ]
  pb = r.get("parameter_bytes", {})
  stored_total = sum(pb.get("stored", {}).values())
  for name, by_dtype in pb.items():
    total = sum(by_dtype.values())
    label = "params as stored" if name == "stored" else f"params as {name}"
    lines.append(f"  {label:<21} " + "  ".join(f"{k} {_b(v)}" for k, v in by_dtype.items())
                 + f"  (total {_b(total)}"
                 + ("" if name == "stored" else f", {stored_total / total:.2f}x smaller") + ")")
  if inf["kv_per_token"]:
    lines.append(f"  KV cache ({inf['kv_dtype']})   {_b(inf['kv_per_token'])}/token, "
                 f"{_b(inf['kv_at_context'])} at {inf['context']:,} tokens")
  else:
    lines.append("  KV cache              none (encoder-only)")
  lines += [
      "",
      f"roofline on {dev['name']}: {dev['peak_flops'] / 1e12:.4g} TFLOP/s, "
      f"{dev['hbm_bw'] / 1e12:.3g} TB/s" + (" (measured)" if dev.get("measured") else " (published)"),
      f"  compute {roof['compute_s'] * 1e3:.2f} ms, memory {roof['memory_s'] * 1e3:.2f} ms "
      f"-> step >= {roof['step_s'] * 1e3:.2f} ms ({roof['bound']}-bound)",
      f"  tokens/s <= {roof['tokens_per_s']:,.0f} ({roof['tokens_per_s_per_device']:,.0f} "
      "per device)",
  ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  try:
    cfg = _CONFIG.value
    if cfg is not None:
      cfg.to_dict()  # a config that failed to load raises here, not later
  except (OSError, ImportError, AttributeError, KeyError, TypeError, ValueError,
          SyntaxError) as e:
    _fail(f"--config: {_one_line(e)}")
  if cfg is None and _HF.value is None:
    _fail("give --config=configs/X.py or --hf=DIR")
  if cfg is not None and _HF.value is not None:
    _fail("give either --config or --hf, not both")
  try:
    r = build(cfg, _HF.value, _MESH.value, _DEVICE.value, _SEQ_LEN.value, _BATCH.value,
              _QUANTIZE.value, _GROUP_SIZE.value)
  except (JaxlmError, ValueError) as e:
    _fail(_one_line(e))
  print(json.dumps(r, indent=2, default=str) if _JSON.value else format_table(r))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
