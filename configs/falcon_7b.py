"""Falcon-7B shape (32 layers, 4544 wide, 71 query heads over one KV head (multi-query) of
64 dims, attention and a 18176-wide exact-GELU MLP in parallel from ONE LayerNorm, no
biases, RoPE theta 10000, tied LM head) as a causal LM on the embedded corpus.

  python -m jaxlm.main --config=configs/falcon_7b.py --workdir=runs/falcon_7b

The vocabulary is trained on the corpus (vocab_size follows the tokenizer; Falcon's own is
65024, which makes 6.92B parameters); everything else is the published shape
(tiiuae/falcon-7b). The full size validates and builds abstractly here
(`python -m jaxlm.report --config=configs/falcon_7b.py` sizes it); `configs/falcon_7b.py:tiny`
keeps the architecture (multi-query, one shared norm per block) and trains in seconds on a
CPU. Start from a real checkpoint with `--config.model.init_from=DIR` (a Hugging Face
Falcon directory).
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="falcon", architectures=["FalconForCausalLM"], causal=True,
      hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, num_key_value_heads=1,
      intermediate_size=4 * 4544, hidden_act="gelu", mlp_type="plain", mlp_bias=False,
      attention_bias=False, norm_type="layernorm", norm_position="pre", layer_norm_eps=1e-5,
      parallel_residual=True, parallel_shared_norm=True, position_embedding_type="rope",
      rope_theta=10000.0, max_position_embeddings=2048, type_vocab_size=0,
      tie_word_embeddings=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      dtype="bfloat16")
  experiment.causal_lm_run(c, max_seq_len=2048, batch_size=8, learning_rate=3e-4)
  if arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, intermediate_size=256, max_position_embeddings=128,
                   dtype="float32")
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/falcon_7b.py or :tiny")
  return c
