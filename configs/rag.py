"""Retrieval-augmented quote completion on the embedded corpus (issue 17's end-to-end
proof; benchmarks/rag_quotes.py runs every step and scores it):

  python -m jaxlm.main --config=configs/gpt2_small.py:rag --workdir=runs/rag_lm
  python -m jaxlm.main --mode=index --config=configs/rag.py --workdir=runs/rag_index
  python benchmarks/rag_quotes.py --data-only     # runs/rag_quotes/sft.jsonl
  python -m jaxlm.main --mode=finetune --config=configs/rag.py:sft --workdir=runs/rag_sft
  python -m jaxlm.main --mode=rag --config=configs/rag.py --workdir=runs/rag_index \\
      --config.rag.generator=runs/rag_sft --prompt="Now is the winter of our discontent"

The generator is a 4-layer, 128-wide GPT pretrained on the train split only
(gpt2_small.py:rag), then tuned with the SFT task on RAG prompts built from train-split
lines: the `rag.k` passages BM25 retrieves for the first half of a line, and the line's
first half; the response is its second half. The index holds the whole corpus, the
test-split scenes included, so at test time the passages can hold lines the generator
never saw. The plain config indexes data.source (the embedded corpus); `:sft` tunes the
generator on runs/rag_quotes/sft.jsonl; `:sft,tiny` is a smoke run of that.
"""

from jaxlm import experiment

TEMPLATE = "Complete the line from the passages.\n{context}Line: {question}"


def get_config(arg=None):
  c = experiment.base_config()
  experiment.finetune_run(c, objective="sft", dataset="", steps=3000, learning_rate=1e-3,
                          metric="loss", eval_every=500)
  c.model.init_from = "runs/rag_lm"
  c.model.update(dtype="float32")
  c.data.max_seq_len = 256
  c.train.batch_size = 16
  c.eval.update(batch_size=64, max_batches=8)
  c.finetune.update(generate_max_new_tokens=24, generate_examples=200)
  c.generate.update(max_new_tokens=24, batch_size=32)
  # Short chunks, two of them: the line is whole in a chunk (chunks end at line breaks),
  # and short prompts pack two pairs a 256-token row.
  c.rag.update(retriever="bm25", tokenizer="runs/rag_lm", chunk_tokens=32, chunk_overlap=0,
               generator="runs/rag_sft", template=TEMPLATE, k=2, stop="")
  variants = set((arg or "").split(",")) - {""}
  if "sft" in variants:
    c.data.source = "runs/rag_quotes/sft.jsonl"
  if "tiny" in variants:
    experiment.finetune_tiny(c)
    c.eval.batch_size = 16
  if variants - {"sft", "tiny"}:
    raise ValueError(f"unknown variant {arg!r}; use :sft, :tiny (comma-separated)")
  return c
