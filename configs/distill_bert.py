"""DistilBERT's recipe on the main job's BERT (configs/default.py: 2 post-LN layers, 128
wide, rotary positions): a 1-layer student that starts as the teacher's layer 0 (with its
embeddings and MLM head) learns masked-token prediction from the teacher (tasks/distill.py).

  python -m jaxlm.main --config=configs/default.py --workdir=runs/default
  python -m jaxlm.main --config=configs/distill_bert.py --workdir=runs/distill_bert

Loss at the masked positions: 2 x the MLM NLL + 5 x T^2 KL(teacher || student) at T = 2,
plus 1 x the cosine loss between the last hidden states at every real token (DistilBERT's
weights). The student has no NSP head (BertForMaskedLM) and keeps the teacher's tokenizer.
`:tiny` is a smoke run: its teacher is a `configs/default.py:tiny` run (pass its workdir
as --config.distill.teacher=DIR).
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(architectures=["BertForMaskedLM"], hidden_size=128, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=512, max_position_embeddings=128,
                 position_embedding_type="rope", dtype="bfloat16", hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
  c.data.max_seq_len = 128
  c.train.update(objective="distill", steps=3000, batch_size=32, learning_rate=2e-3,
                 warmup_steps=200, eval_every=500, log_every=50)
  c.checkpoint.every = 500
  c.distill.update(teacher="runs/default", temperature=2.0, alpha_kl=5.0, alpha_hard=2.0,
                   alpha_cos=1.0, init_from_teacher_layers=True)
  if arg == "tiny":
    c.model.update(hidden_size=32, intermediate_size=64, max_position_embeddings=64,
                   dtype="float32")
    c.data.max_seq_len = 64
    c.train.update(steps=10, batch_size=8, warmup_steps=2, eval_every=5, log_every=5)
    c.eval.update(batch_size=32, max_batches=2, fill_mask_examples=2)
    c.checkpoint.every = 5
    c.distill.teacher = "runs/default_tiny"
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/distill_bert.py or :tiny")
  return c
