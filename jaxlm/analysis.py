"""Model arithmetic for `python -m jaxlm.report`: parameters, FLOPs, memory, roofline.

Pure functions of a ModelConfig (and, for the parameter table, an abstract model built
with `auto.build_abstract_model`: shapes only, nothing allocated). Notation: D hidden
size, L layers, Hq / Hkv query / key-value heads, hd head size, F MLP width, V vocab,
E experts (top-k routing), T sequence length, B batch.

Parameters
  * total: every nnx.Param of the abstract model; a tied LM head is counted once (as
    transformers' `num_parameters()` does).
  * embedding: the lookup tables (token, learned position, token type, T5's relative
    position buckets). An untied LM head is listed separately (`lm_head`) and is part of
    non-embedding = total - embedding.
  * active per token (MoE): expert weights count k/E of their size.
  * `closed_form_params` recomputes the same numbers from the config alone; the report
    cross-checks the two.

Training FLOPs per token (MaxText's `calculate_tflops_training_per_device` accounting)
  * weights: 6 x (matmul parameters a token passes through, per token), i.e. per layer
    D*(Hq + 2*Hkv)*hd (q, k, v) + Hq*hd*D (output projection) + n*D*F for the MLP
    (n = 3 gated, 2 plain; times k for MoE, plus the D*E router), summed over layers,
    plus D*V for the LM-head / vocabulary projection (counted whether tied or not).
    Biases, norms and the small task heads (pooler, MLM transform, NSP) are left out.
    6 = 2 (multiply-add) x 3 (forward + two backward matmuls).
  * attention: 12 x T_eff x Hq x hd per layer (QK^T and PV, forward + backward), halved
    for causal self-attention (the masked upper triangle is not counted), where
    T_eff = min(T, the layer's window) (Gemma 2 alternates windowed and full layers).
  * T5 (encoder-decoder): encoder and decoder lengths are both T, FLOPs are per target
    token: encoder layers (bidirectional attention) + decoder layers with causal self-
    attention and a bidirectional cross-attention (its q/k/v/o matmuls counted too).
  * BERT MLM trains its vocabulary projection only at the masked positions; the count
    (like MaxText) charges it at every position unless `head_fraction` says which
    fraction of positions it runs at (the training loop's `mfu` passes MLM's).

Training memory per device
  * state: parameters and gradients in param_dtype, Adam's two moments in param_dtype
    (SGD: one momentum buffer). bf16 compute (model.dtype) does not change them. Each
    parameter's per-device share follows the config's mesh rules (`mesh.rules`: fsdp
    splits the `embed` dimension, tensor the heads / mlp / vocab ones, expert the
    experts), the way `jaxlm.parallel.rules.logical_to_spec` does; a dimension an axis
    does not divide stays replicated.
  * activations (an approximation): per sequence per layer, with the compute dtype's
    bytes b (Korthikanti et al. 2022, "Reducing Activation Recomputation", counts
    b = 2):
      remat=none: b/2 * (10*T*D + (24*T*D + 5*Hq*T^2) / tensor) bytes (the 5*Hq*T^2
        score terms drop out with a flash kernel, attention_impl != "xla");
      remat=full: b*T*D (the block input) per layer, plus one layer's `none` working set;
      remat=dots: the matmul outputs, b*T*((Hq + 2*Hkv)*hd + Hq*hd + D + D + n'*F*k)
        (n' = 2 gated, 1 plain; / tensor for the sharded ones) plus Hq*T^2 score
        entries with attention_impl="xla", plus the block input, plus one layer's `none`
        working set;
    plus f32 logits, 4*T*V / tensor bytes per sequence. Sequences per device: the
    microbatch over data x fsdp x expert.

Inference memory
  * weights: total parameters x 4 / 2 / 1 bytes (f32 / bf16 / int8).
  * KV cache: 2 x L_dec x Hkv x hd x bytes per token, and at the full context
    (max_position_embeddings), where a layer with a smaller sliding window holds only
    the window (a ring buffer).

Roofline
  * step time >= max(FLOPs / peak FLOP/s, HBM bytes / bandwidth) per device; the bytes
    are the optimizer update (params r/w, grads r/w, moments r/w) plus three reads of
    the weights in the compute dtype and a write + read of the saved activations.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
import types
from typing import Any

from jaxlm.config import ModelConfig, Runtime

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}

# Published dense bf16 peaks (no sparsity) and HBM bandwidths / capacities:
#   h100: NVIDIA H100 SXM5 datasheet (nvidia.com/en-us/data-center/h100): 989 TFLOP/s
#         (1979 "with sparsity"), 3.35 TB/s, 80 GB.
#   h200: NVIDIA H200 SXM datasheet (nvidia.com/en-us/data-center/h200): 989 TFLOP/s,
#         4.8 TB/s, 141 GB.
#   tpu-v5e: cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 819 GB/s, 16 GB.
#   tpu-v5p: cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 2765 GB/s, 95 GB.
#   tpu-v6e: cloud.google.com/tpu/docs/v6e (Trillium): 918 TFLOP/s, 1640 GB/s, 32 GB.
DEVICES = {
    "h100": dict(name="NVIDIA H100 SXM", peak_flops=989e12, hbm_bw=3.35e12, hbm_bytes=80e9),
    "h200": dict(name="NVIDIA H200 SXM", peak_flops=989e12, hbm_bw=4.8e12, hbm_bytes=141e9),
    "tpu-v5e": dict(name="TPU v5e", peak_flops=197e12, hbm_bw=819e9, hbm_bytes=16e9),
    "tpu-v5p": dict(name="TPU v5p", peak_flops=459e12, hbm_bw=2765e9, hbm_bytes=95e9),
    "tpu-v6e": dict(name="TPU v6e", peak_flops=918e12, hbm_bw=1640e9, hbm_bytes=32e9),
}
DEVICE_CHOICES = ("cpu", *DEVICES)

_ENCODERS = {"BertForPreTraining", "BertModel", "BertForMaskedLM", "RobertaModel",
             "RobertaForMaskedLM", "DistilBertModel", "DistilBertForMaskedLM"}
_POOLED = {"BertForPreTraining", "BertModel", "RobertaModel"}
_MLM = {"BertForPreTraining", "BertForMaskedLM", "RobertaForMaskedLM",
        "DistilBertForMaskedLM"}
_SEQ2SEQ = {"T5ForConditionalGeneration"}
_EXPERT_LEAVES = {"gate", "up", "down", "gate_bias", "up_bias", "down_bias"}


def arch_of(mc: ModelConfig) -> str:
  return (mc.architectures or ["BertForPreTraining"])[0]


# ---- parameters -------------------------------------------------------------------------
def _norm(mc: ModelConfig) -> int:
  D = mc.hidden_size
  return D if mc.norm_type == "rmsnorm" or not mc.norm_bias else 2 * D


def _attention(mc: ModelConfig) -> int:
  D, hd, Hq, Hkv = mc.hidden_size, mc.head_size, mc.num_attention_heads, mc.kv_heads
  out_bias = mc.attention_bias if mc.attention_out_bias is None else mc.attention_out_bias
  n = D * (Hq + 2 * Hkv) * hd + Hq * hd * D
  if mc.attention_bias:
    n += (Hq + 2 * Hkv) * hd
  if mc.qk_norm == "rmsnorm":  # one [head_dim] scale each for q and k
    n += 2 * hd
  elif mc.qk_norm == "layernorm":  # a scale per head
    n += (Hq + Hkv) * hd
  return n + (D if out_bias else 0)


def _mlp_one(mc: ModelConfig) -> tuple[int, int]:
  """(weights, biases) of one dense MLP / one expert."""
  D, F = mc.hidden_size, mc.intermediate_size
  gated = mc.mlp_type == "gated"
  w = (3 if gated else 2) * D * F
  b = ((2 if gated else 1) * F + D) if mc.mlp_bias else 0
  return w, b


def _mlp(mc: ModelConfig) -> tuple[int, int]:
  """(all MLP parameters of one layer, of which expert parameters)."""
  w, b = _mlp_one(mc)
  E = mc.num_local_experts
  if not E:
    return w + b, 0
  return E * (w + b) + mc.hidden_size * E, E * (w + b)


def closed_form_params(mc: ModelConfig) -> dict[str, int]:
  """Parameter counts from the config alone (no model built)."""
  arch, D, V = arch_of(mc), mc.hidden_size, mc.vocab_size
  mlp, expert = _mlp(mc)
  lm_head = 0 if mc.tie_word_embeddings else D * V
  if arch in _SEQ2SEQ:
    Le, Ld = mc.num_hidden_layers, mc.decoder_layers
    rel = 2 * mc.relative_attention_num_buckets * mc.num_attention_heads
    embedding = V * D + rel
    enc = Le * (_attention(mc) + mlp + 2 * _norm(mc)) + _norm(mc)
    dec = Ld * (2 * _attention(mc) + mlp + 3 * _norm(mc)) + _norm(mc)
    total = embedding + enc + dec + lm_head
    expert *= Le + Ld
  elif arch in _ENCODERS:
    L = mc.num_hidden_layers
    position = mc.max_position_embeddings * D if mc.position_embedding_type == "absolute" else 0
    embedding = V * D + position + mc.type_vocab_size * D
    total = embedding + 2 * D + L * (_attention(mc) + mlp + 2 * _norm(mc))
    if arch in _POOLED:
      total += D * D + D
    if arch in _MLM:
      total += D * D + D + 2 * D + V + lm_head
    else:
      lm_head = 0
    if arch == "BertForPreTraining":
      total += 2 * D + 2
    expert *= L
  else:  # decoder-only causal LMs
    L = mc.num_hidden_layers
    position = mc.max_position_embeddings * D if mc.position_embedding_type == "absolute" else 0
    embedding = V * D + position
    # sandwich: the sublayer outputs are normed too; a shared parallel norm serves both
    norms = 4 if mc.sandwich_norm else 1 if mc.parallel_shared_norm else 2
    total = embedding + L * (_attention(mc) + mlp + norms * _norm(mc)) + lm_head
    total += _norm(mc) if mc.embedding_norm else 0
    total += _norm(mc) if mc.norm_position == "pre" else 0
    expert *= L
  return _summary(total, embedding, lm_head, expert, mc)


def _summary(total, embedding, lm_head, expert, mc) -> dict[str, int]:
  E, k = mc.num_local_experts, mc.num_experts_per_tok
  inactive = expert - expert * k // E if E else 0
  return dict(total=total, embedding=embedding, non_embedding=total - embedding,
              lm_head=lm_head, experts=expert, active=total - inactive,
              active_non_embedding=total - embedding - inactive)


def param_table(model) -> list[dict[str, Any]]:
  """One row per parameter of an (abstract) model: name, shape, dtype, logical axes."""
  from flax import nnx

  from jaxlm.params import path_name
  rows = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    rows.append(dict(name=path_name(path), shape=tuple(value.shape),
                     dtype=str(value.dtype), axes=var.get_metadata().get("axes")))
  return rows


def abstract_params(rows, mc: ModelConfig) -> dict[str, int]:
  """The parameter summary counted from `param_table` rows."""
  total = embedding = lm_head = expert = 0
  for r in rows:
    n = math.prod(r["shape"])
    total += n
    leaf = r["name"].rsplit(".", 1)[-1]
    if leaf == "embedding":
      embedding += n
    elif r["name"] in ("lm_head.kernel", "mlm.decoder.kernel"):
      lm_head += n
    elif mc.num_local_experts and leaf in _EXPERT_LEAVES and ".mlp." in "." + r["name"]:
      expert += n
  return _summary(total, embedding, lm_head, expert, mc)


# ---- FLOPs ---------------------------------------------------------------------------
def training_flops_per_token(mc: ModelConfig, seq_len: int,
                             head_fraction: float = 1.0) -> dict[str, float]:
  """MaxText's accounting (see the module docstring); FLOPs per (target) token.
  `head_fraction`: the fraction of positions the vocabulary projection runs at."""
  D, hd, Hq, Hkv = mc.hidden_size, mc.head_size, mc.num_attention_heads, mc.kv_heads
  F, V, E, k = mc.intermediate_size, mc.vocab_size, mc.num_local_experts, mc.num_experts_per_tok
  qkv, proj = D * (Hq + 2 * Hkv) * hd, Hq * hd * D
  ffn = (3 if mc.mlp_type == "gated" else 2) * D * F
  if E:
    ffn = ffn * k + D * E  # top-k experts plus the router
  # QK^T + PV, forward and backward, for one layer: each layer attends within its own
  # window (layer_windows; the same one for all without layer_types), so the mean over layers
  windows = mc.layer_windows()
  attn_one = 12 * Hq * hd * sum(min(seq_len, w or seq_len) for w in windows) / len(windows)
  if arch_of(mc) in _SEQ2SEQ:
    Le, Ld = mc.num_hidden_layers, mc.decoder_layers
    weights = Le * (qkv + proj + ffn) + Ld * (2 * (qkv + proj) + ffn) + head_fraction * D * V
    attention = attn_one * (Le + Ld / 2 + Ld)
  else:
    L = mc.num_hidden_layers
    weights = L * (qkv + proj + ffn) + head_fraction * D * V
    attention = attn_one * L * (0.5 if mc.causal else 1.0)
  return dict(weight_params=weights, weights=6.0 * weights, attention=float(attention),
              total=6.0 * weights + attention)


# ---- memory --------------------------------------------------------------------------
def shard_factor(shape, axes, rules, mesh: dict[str, int]) -> int:
  """How many ways a parameter is split over `mesh` under `rules`."""
  from jaxlm.parallel.rules import logical_to_spec
  if not axes:
    return 1
  spec = logical_to_spec(axes, rules, types.SimpleNamespace(shape=mesh), shape)
  n = 1
  for entry in spec:
    for m in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
      n *= mesh[m]
  return n


def per_device_params(rows, rules, mesh: dict[str, int]) -> float:
  """Parameters held by one device (fractional when a shard is uneven: an average)."""
  return sum(math.prod(r["shape"]) / shard_factor(r["shape"], r["axes"], rules, mesh)
             for r in rows)


def layer_activation_bytes(mc: ModelConfig, rt: Runtime, T: int, tensor: int,
                           remat: str) -> float:
  """Saved activations of one block for one sequence (module docstring)."""
  D, hd, Hq, Hkv = mc.hidden_size, mc.head_size, mc.num_attention_heads, mc.kv_heads
  b = DTYPE_BYTES[rt.dtype]
  scores = rt.attention_impl == "xla"
  none = b / 2 * (10 * T * D + (24 * T * D + (5 * Hq * T * T if scores else 0)) / tensor)
  if remat == "none":
    return none
  if remat == "full":
    return b * T * D
  k = mc.num_experts_per_tok if mc.num_local_experts else 1
  n_up = 2 if mc.mlp_type == "gated" else 1
  sharded = (Hq + 2 * Hkv) * hd + Hq * hd + n_up * mc.intermediate_size * k
  dots = b * T * (2 * D + sharded / tensor) + (b * Hq * T * T / tensor if scores else 0)
  return dots + b * T * D


def training_memory(mc: ModelConfig, rows, *, rules, mesh: dict[str, int], seq_len: int,
                    batch: int, grad_accum: int = 1, optimizer: str = "adamw",
                    runtime: Runtime = Runtime()) -> dict:
  p_bytes = DTYPE_BYTES[mc.param_dtype]
  n_dev = per_device_params(rows, rules, mesh)
  moments = 2 if optimizer == "adamw" else 1
  dp = mesh["data"] * mesh["fsdp"] * mesh["expert"]
  seqs = batch / dp / grad_accum
  T, t = seq_len, mesh["tensor"]
  layers = (mc.num_hidden_layers + mc.decoder_layers if arch_of(mc) in _SEQ2SEQ
            else mc.num_hidden_layers)
  per_layer = layer_activation_bytes(mc, runtime, T, t, runtime.remat)
  act = layers * per_layer
  if runtime.remat != "none":  # recomputing one block needs its full working set
    act += layer_activation_bytes(mc, runtime, T, t, "none")
  act = seqs * (act + 4 * T * mc.vocab_size / t)
  out = dict(params_per_device=n_dev, params=n_dev * p_bytes, grads=n_dev * p_bytes,
             optimizer=moments * n_dev * p_bytes, activations=act,
             sequences_per_device=seqs)
  out["total"] = out["params"] + out["grads"] + out["optimizer"] + act
  return out


def kv_cache_bytes_per_token(mc: ModelConfig, dtype_bytes: int) -> int:
  if arch_of(mc) in _ENCODERS:
    return 0
  return 2 * mc.decoder_layers * mc.kv_heads * mc.head_size * dtype_bytes


def inference_memory(mc: ModelConfig, total_params: int, kv_dtype: str = "float32") -> dict:
  full = mc.max_position_embeddings
  per_token = kv_cache_bytes_per_token(mc, DTYPE_BYTES[kv_dtype])
  # Slots each decoder layer keeps at the full context (a window: a ring buffer).
  slots = ([full] * mc.decoder_layers if arch_of(mc) in _SEQ2SEQ
           else [min(full, w or full) for w in mc.layer_windows()])
  return dict(weights={k: total_params * DTYPE_BYTES[k] for k in ("float32", "bfloat16", "int8")},
              kv_dtype=kv_dtype, kv_per_token=per_token, context=max(slots),
              kv_at_context=per_token * sum(slots) // len(slots))


# ---- devices and roofline --------------------------------------------------------------
def measure_cpu(n: int = 2048, runs: int = 10, warm_s: float = 0.5) -> dict:
  """Peak matmul FLOP/s of this host (bf16 in, f32 accumulation; and f32) and the
  bandwidth of an elementwise pass, measured on the spot: the best of `runs` after
  `warm_s` seconds of the same work (a peak is what the machine can do; slower runs only
  show other load on a shared host). Without the timed warm-up, the first matmuls of a
  process ran up to 40% slow here (816 vs 1,376 GFLOP/s bf16 on an Intel Xeon with AMX),
  so a peak measured at start-up could read low and put the loop's MFU above 1."""
  import jax
  import jax.numpy as jnp

  def best_time(fn, *args):
    jax.block_until_ready(fn(*args))  # compile
    t_end = time.perf_counter() + warm_s
    while time.perf_counter() < t_end:
      jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t0)
    return min(times)

  out = {}
  for name, dt in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
    a = jnp.ones((n, n), dt)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    out[name] = 2 * n ** 3 / best_time(mm, a, a)
  x = jnp.ones((32 * 1024 * 1024,), jnp.float32)  # 128 MiB in, 128 MiB out
  bw = 2 * x.nbytes / best_time(jax.jit(lambda v: v * 2.0 + 1.0), x)
  return dict(name=f"this CPU (measured: {n}^3 matmul, best of {runs})",
              peak_flops=out["bfloat16"], peak_flops_f32=out["float32"], hbm_bw=bw,
              hbm_bytes=None, measured=True)


PEAK_CACHE_S = 24 * 3600


def _peak_cache() -> tuple[str, str]:
  """(the cache file, this machine's key in it): the CPU model, cores and jax version."""
  import jax
  model = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
  except OSError:
    pass
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return (os.path.join(root, "jaxlm", "cpu_peak.json"),
          f"{model or platform.machine()}|{os.cpu_count()}|jax {jax.__version__}")


def _cached_peak(path: str, key: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      entry = json.load(f).get(key)
    if entry and 0 <= time.time() - entry["time"] < PEAK_CACHE_S:
      return dict(entry["spec"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    pass
  return None


def remember_cpu_peak(spec: dict) -> None:
  """Caches `spec`, keeping the higher peaks of it and a still-valid cached reading."""
  path, key = _peak_cache()
  old = _cached_peak(path, key)
  if old:
    spec = {**spec, **{k: max(spec[k], old[k]) for k in ("peak_flops", "peak_flops_f32",
                                                         "hbm_bw") if k in old}}
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({key: {"time": time.time(), "spec": spec}}, f)
    os.replace(tmp, path)
  except OSError:  # a read-only home: measure every time
    pass


def cpu_peak() -> dict:
  """`measure_cpu`, remembered for a day per machine (CPU model, cores, jax version) in
  ~/.cache/jaxlm/cpu_peak.json: it costs ~4.5 s, every CLI training run paid it for its
  MFU, and the peak of a machine does not change. A reading that proves low (an MFU above
  1) is taken again and replaced (loop.py). JAXLM_CPU_PEAK_CACHE=0 measures every time."""
  if os.environ.get("JAXLM_CPU_PEAK_CACHE", "1") != "0":
    cached = _cached_peak(*_peak_cache())
    if cached:
      return cached
  spec = measure_cpu()
  remember_cpu_peak(spec)
  return spec


def device_spec(name: str, dtype: str = "bfloat16") -> dict:
  if name == "cpu":
    spec = measure_cpu()
    if dtype == "float32":
      spec["peak_flops"] = spec["peak_flops_f32"]
    return spec
  return dict(DEVICES[name], measured=False)


def roofline(mc: ModelConfig, flops_per_token: float, train_mem: dict, *, device: dict,
             seq_len: int, batch: int, num_devices: int, runtime: Runtime = Runtime()) -> dict:
  tokens = seq_len * batch
  flops = flops_per_token * tokens / num_devices
  n = train_mem["params_per_device"]
  p, c = DTYPE_BYTES[mc.param_dtype], DTYPE_BYTES[runtime.dtype]
  # optimizer: params r/w, grads w/r, each moment r/w; model: 3 weight reads; activations w/r
  moments = train_mem["optimizer"] / (p * n) if n else 2
  hbm = n * p * (2 + 2 + 2 * moments) + 3 * n * c + 2 * train_mem["activations"]
  compute_s, memory_s = flops / device["peak_flops"], hbm / device["hbm_bw"]
  step = max(compute_s, memory_s)
  return dict(flops_per_device=flops, hbm_bytes_per_device=hbm, compute_s=compute_s,
              memory_s=memory_s, step_s=step, bound="compute" if compute_s >= memory_s
              else "memory", tokens_per_s=tokens / step,
              tokens_per_s_per_device=tokens / step / num_devices)


def report(mc: ModelConfig, rows, *, rules, mesh: dict[str, int], seq_len: int, batch: int,
           device: dict, grad_accum: int = 1, optimizer: str = "adamw",
           runtime: Runtime = Runtime()) -> dict:
  counted = abstract_params(rows, mc)
  closed = closed_form_params(mc)
  flops = training_flops_per_token(mc, seq_len)
  mem = training_memory(mc, rows, rules=rules, mesh=mesh, seq_len=seq_len, batch=batch,
                        grad_accum=grad_accum, optimizer=optimizer, runtime=runtime)
  num_devices = math.prod(mesh.values())
  roof = roofline(mc, flops["total"], mem, device=device, seq_len=seq_len, batch=batch,
                  num_devices=num_devices, runtime=runtime)
  return dict(
      model=dict(architecture=arch_of(mc), hidden_size=mc.hidden_size,
                 layers=mc.num_hidden_layers, heads=mc.num_attention_heads,
                 kv_heads=mc.kv_heads, head_size=mc.head_size,
                 intermediate_size=mc.intermediate_size, vocab_size=mc.vocab_size,
                 experts=mc.num_local_experts, dtype=runtime.dtype,
                 param_dtype=mc.param_dtype, remat=runtime.remat,
                 attention_impl=runtime.attention_impl),
      parameters=dict(counted, closed_form=closed, closed_form_matches=closed == counted),
      training_flops_per_token=flops,
      training_memory_per_device=mem,
      inference_memory=inference_memory(mc, counted["total"], runtime.dtype),
      roofline=dict(roof, device={k: v for k, v in device.items()}),
      run=dict(seq_len=seq_len, batch=batch, grad_accum=grad_accum, mesh=mesh,
               num_devices=num_devices, optimizer=optimizer),
  )


# ---- MFU in training metrics --------------------------------------------------------
# jax device_kind -> DEVICES entry (as JAX reports them).
_DEVICE_KINDS = {"H100": "h100", "H200": "h200", "TPU v5 lite": "tpu-v5e", "TPU v5e": "tpu-v5e",
                 "TPU v5p": "tpu-v5p", "TPU v5": "tpu-v5p", "TPU v6 lite": "tpu-v6e",
                 "TPU v6e": "tpu-v6e"}


@functools.lru_cache(maxsize=4)
def job_peak_flops(compute_dtype: str) -> tuple[float, str] | None:
  """(peak FLOP/s of all devices of this job, where it comes from), or None for an
  unknown accelerator. CPU devices share the host's cores, so a CPU job's peak is the
  host's measured matmul peak (`measure_cpu`) times the number of hosts."""
  import jax
  kind = jax.devices()[0].device_kind
  if jax.default_backend() == "cpu":
    spec = cpu_peak()
    key = "peak_flops_f32" if compute_dtype == "float32" else "peak_flops"
    return spec[key] * jax.process_count(), "measured"
  name = next((v for k, v in _DEVICE_KINDS.items() if k.lower() in kind.lower()), None)
  if name is None:
    return None
  return DEVICES[name]["peak_flops"] * jax.device_count(), DEVICES[name]["name"]
