"""Distillation of the 4-layer GPT-2-shaped decoder of `configs/gpt2_small.py:mini` into a
2-layer student of the same width that starts as its layers 0 and 2 (tasks/distill.py).

  python -m jaxlm.main --config=configs/gpt2_small.py:mini --workdir=runs/compress_teacher
  python -m jaxlm.main --config=configs/distill_gpt2.py --workdir=runs/compress_student

The student keeps the teacher's tokenizer and vocabulary (the data are tokenized with it),
so its export (runs/compress_student/model, Hugging Face format) can draft for the teacher
in speculative decoding. Loss: 0.5 x the next-token NLL + 0.5 x T^2 KL(teacher || student)
at T = 2; same schedule and steps as the teacher. `benchmarks/compress_distill.py` compares
it with the same student trained from scratch (`:scratch`, train.objective=causal).
`:tiny` is a smoke run: its teacher is a `configs/gpt2_small.py:tiny` run (pass its
workdir as --config.distill.teacher=DIR).
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="gpt2", architectures=["GPT2LMHeadModel"], causal=True,
      hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
      hidden_act="gelu_new", norm_type="layernorm", norm_position="pre", layer_norm_eps=1e-5,
      position_embedding_type="absolute", max_position_embeddings=128, type_vocab_size=0,
      tie_word_embeddings=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      dtype="bfloat16")
  experiment.causal_lm_run(c, max_seq_len=128, batch_size=32, learning_rate=2e-3)
  c.train.update(objective="distill", steps=2000, warmup_steps=100, eval_every=500,
                 log_every=50)
  c.eval.update(batch_size=64, max_batches=10)
  c.checkpoint.every = 500
  c.distill.update(teacher="runs/compress_teacher", temperature=2.0, alpha_kl=0.5,
                   alpha_hard=0.5, alpha_cos=0.0, init_from_teacher_layers=True)
  if arg == "scratch":  # the same student, same data and schedule, without the teacher
    c.train.objective = "causal"
    c.tokenizer.path = "runs/compress_teacher/model"
  elif arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=1, intermediate_size=256,
                   max_position_embeddings=64, dtype="float32")
    experiment.tiny_run(c)
    c.train.update(steps=20, eval_every=10, log_every=10)
    c.checkpoint.every = 10
    c.distill.teacher = "runs/gpt2_tiny"
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/distill_gpt2.py, :scratch or :tiny")
  return c
