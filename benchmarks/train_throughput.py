"""Training throughput of one framework on one model: jaxlm's own train step, or the
Hugging Face PyTorch equivalent with the identical config, on synthetic batches.

  python benchmarks/train_throughput.py --framework jaxlm|torch --model bert|gpt|llama \\
      --precision fp32|bf16 [--steps 20] [--warmup 3] [--batch B] [--seq T]

Standard shapes (override with --batch/--seq):
  bert : BERT-MLM+NSP, hidden 256, 4 layers, 4 heads, FFN 1024, vocab 8192, seq 128,
         batch 16, 15% masked positions (max_predictions(T, 0.15) per row)
  gpt  : GPT-2 layout (pre-LN, learned positions, gelu_new, tied head), d 256, 4 layers,
         4 heads, FFN 1024, vocab 8192, seq 256, batch 8
  llama: d 512, 8 layers, 8 query heads over 2 KV heads, SwiGLU FFN 1376, RMSNorm, RoPE
         (theta 500000, no scaling), tied head, vocab 8192, seq 512, batch 4

Both sides: dropout 0, AdamW (lr 1e-4, weight decay 0.01, grad-norm clip 1.0), fp32
parameters. bf16 is jaxlm's `train.precision=bf16` (bf16 compute, f32 params) and
`torch.autocast("cpu", dtype=torch.bfloat16)` on the torch side. The torch BERT head
projects only the masked positions (the same work jaxlm does; HF's BertForPreTraining
would project all positions; --torch-mlm-all-positions restores that). torch attention
is `sdpa` unless --torch-attn eager.

Prints ONE JSON line: framework, model, precision, tokens_per_s (median over the counted
steps), step_time_s {min, median, max}, compile_s (the first step, compile included for
jaxlm), peak_rss_mib (getrusage maxrss), plus shapes and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import bert_batch, causal_batch  # noqa: E402  (benchmarks/common.py)

VOCAB = 8192
DEFAULT_SHAPE = {"bert": (16, 128), "gpt": (8, 256), "llama": (4, 512)}
LR, WD, CLIP = 1e-4, 0.01, 1.0


# ---------------------------------------------------------------- synthetic batches (numpy)
# ---------------------------------------------------------------- jaxlm
def jaxlm_setup(model: str, T: int):
  """(experiment config, objective, batch maker): BERT and GPT are the `:bench` configs
  (the shapes above, shared with benchmarks/loop_vs_step.py), Llama is configs/llama_1b.py
  shrunk here."""
  from configs import bert_tiny, gpt2_small, llama_1b
  if model in ("bert", "gpt"):
    cfg = (bert_tiny if model == "bert" else gpt2_small).get_config("bench")
    cfg.model.max_position_embeddings = T
    return cfg, ("mlm+nsp" if model == "bert" else "causal"), (
        bert_batch if model == "bert" else causal_batch)
  cfg = llama_1b.get_config()
  cfg.model.update(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, intermediate_size=1376, max_position_embeddings=T,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  return cfg, "causal", causal_batch


def jaxlm_train_state(model: str, precision: str, B: int, T: int):
  """(train step, params, optimizer state, batch, model config, objective) of jaxlm's own
  train step on one synthetic batch, as this benchmark runs it."""
  import jax
  from flax import nnx
  from jaxlm import experiment, tasks
  from jaxlm.models import auto
  from jaxlm.train.optim import make_optimizer
  from jaxlm.train.steps import make_train_step

  cfg, objective, make_batch = jaxlm_setup(model, T)
  cfg.train.precision = precision
  cfg.train.update(learning_rate=LR, warmup_steps=0, decay="constant", weight_decay=WD,
                   grad_clip_norm=CLIP, b2=0.999, eps=1e-8)
  # rope_scaling dropped: plain RoPE on both sides (Llama)
  mc = experiment.model_config(cfg).replace(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1,
                                            rope_scaling=None)
  model = auto.build_model(mc, runtime=experiment.runtime(cfg), seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx, _ = make_optimizer(cfg.train)
  opt_state = tx.init(params)
  step = make_train_step(graphdef, tx, tasks.get(objective), seed=0, dropout=False)
  batch = jax.device_put(make_batch(np.random.default_rng(0), B, T, VOCAB))
  return step, params, opt_state, batch, mc, objective


def run_jaxlm(model, precision, B, T, steps, warmup):
  import jax
  step, params, opt_state, batch, _, _ = jaxlm_train_state(model, precision, B, T)
  times, losses = [], []
  for s in range(warmup + steps):
    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, batch, s)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
    losses.append(float(m["loss"]))
  return times, losses, {"jax": jax.__version__}


# ---------------------------------------------------------------- torch
def torch_model(model, T, attn):
  import transformers as tf
  common = dict(vocab_size=VOCAB, attn_implementation=attn)
  if model == "bert":
    c = tf.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=1024, max_position_embeddings=T, type_vocab_size=2,
                      hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, pad_token_id=0, **common)
    return tf.BertForPreTraining(c)
  if model == "gpt":
    c = tf.GPT2Config(n_embd=256, n_layer=4, n_head=4, n_inner=1024, n_positions=T,
                      activation_function="gelu_new", layer_norm_epsilon=1e-5,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, **common)
    return tf.GPT2LMHeadModel(c)
  c = tf.LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2, intermediate_size=1376, hidden_act="silu",
                     max_position_embeddings=T, rms_norm_eps=1e-5, rope_theta=500000.0,
                     rope_scaling=None, attention_bias=False, mlp_bias=False,
                     attention_dropout=0.0, tie_word_embeddings=True, pad_token_id=0,
                     bos_token_id=1, eos_token_id=1, **common)
  return tf.LlamaForCausalLM(c)


def run_torch(model, precision, B, T, steps, warmup, attn, mlm_all):
  import contextlib
  import torch
  import torch.nn.functional as F
  import transformers
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  net = torch_model(model, T, attn)
  net.train()
  decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
  nodecay = [p for n, p in net.named_parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                           {"params": nodecay, "weight_decay": 0.0}],
                          lr=LR, betas=(0.9, 0.999), eps=1e-8)
  rng = np.random.default_rng(0)
  if model == "bert":
    b = {k: torch.from_numpy(v) for k, v in bert_batch(rng, B, T, VOCAB).items()}
    ids, tt, am = b["input_ids"].long(), b["token_type_ids"].long(), b["attention_mask"].long()
    pos, mids, nsp = b["masked_positions"].long(), b["masked_ids"].long(), b["nsp_label"].long()
    if mlm_all:
      labels = torch.full_like(ids, -100).scatter_(1, pos, mids)

    def loss_fn():
      if mlm_all:
        out = net(input_ids=ids, token_type_ids=tt, attention_mask=am, labels=labels,
                  next_sentence_label=nsp)
        return out.loss
      seq, pooled = net.bert(input_ids=ids, token_type_ids=tt, attention_mask=am,
                             return_dict=False)[:2]
      h = torch.gather(seq, 1, pos[..., None].expand(-1, -1, seq.shape[-1]))
      logits = net.cls.predictions(h)
      nsp_logits = net.cls.seq_relationship(pooled)
      return (F.cross_entropy(logits.float().reshape(-1, VOCAB), mids.reshape(-1))
              + F.cross_entropy(nsp_logits.float(), nsp))
  else:
    b = causal_batch(rng, B, T, VOCAB)
    ids = torch.from_numpy(b["input_ids"]).long()
    tgt = torch.from_numpy(b["targets"]).long()
    am = torch.from_numpy(b["attention_mask"]).long()

    def loss_fn():
      logits = net(input_ids=ids, attention_mask=am).logits
      return F.cross_entropy(logits.float().reshape(-1, VOCAB), tgt.reshape(-1))

  ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
      else contextlib.nullcontext
  times, losses = [], []
  for _ in range(warmup + steps):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with ctx():
      loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
    opt.step()
    losses.append(float(loss.detach()))
    times.append(time.perf_counter() - t0)
  return times, losses, {"torch": torch.__version__, "transformers": transformers.__version__,
                         "torch_threads": torch.get_num_threads(), "attn_implementation": attn,
                         "mlm_all_positions": mlm_all if model == "bert" else None}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--framework", choices=("jaxlm", "torch"), required=True)
  ap.add_argument("--model", choices=("bert", "gpt", "llama"), required=True)
  ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
  ap.add_argument("--steps", type=int, default=20, help="counted steps")
  ap.add_argument("--warmup", type=int, default=3, help="uncounted steps (the first compiles)")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--seq", type=int, default=None)
  ap.add_argument("--torch-attn", choices=("sdpa", "eager"), default="sdpa")
  ap.add_argument("--torch-mlm-all-positions", action="store_true")
  a = ap.parse_args()
  B = a.batch or DEFAULT_SHAPE[a.model][0]
  T = a.seq or DEFAULT_SHAPE[a.model][1]
  warmup = max(1, a.warmup)
  if a.framework == "jaxlm":
    times, losses, extra = run_jaxlm(a.model, a.precision, B, T, a.steps, warmup)
  else:
    times, losses, extra = run_torch(a.model, a.precision, B, T, a.steps, warmup,
                                     a.torch_attn, a.torch_mlm_all_positions)
  counted = times[warmup:]
  med = statistics.median(counted)
  out = {"framework": a.framework, "model": a.model, "precision": a.precision,
         "batch": B, "seq_len": T, "steps": a.steps, "warmup": warmup,
         "tokens_per_s": B * T / med,
         "step_time_s": {"min": min(counted), "median": med, "max": max(counted)},
         "compile_s": times[0],
         "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
         "loss_first": losses[0], "loss_last": losses[-1],
         "cpu_count": os.cpu_count(), "python": platform.python_version(), **extra}
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
