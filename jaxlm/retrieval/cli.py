"""`python -m jaxlm.main --mode=index` and `--mode=rag`: the RAG pipeline from the
command line, configured by the `rag` section (experiment.base_config).

  --mode=index   chunks every document of data.source (all splits: the curated base),
                 indexes the chunks with rag.retriever and saves WORKDIR/index. An
                 existing index is kept unless --fresh (then it is moved aside, not lost).
  --mode=rag     --prompt="..." or --prompts_file=FILE: retrieves rag.k passages from
                 WORKDIR/index, fits the prompt (rag.template) to the generator
                 (rag.generator, else model.init_from), generates with the `generate`
                 section's settings, and prints the answer with the ids of the passages
                 it was given (JSONL for a prompts file, to --output or stdout).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from tqdm import tqdm

from jaxlm import experiment
from jaxlm.data import clean, corpus, sources
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError
from jaxlm.generate.cli import read_prompts, sampling_kwargs
from jaxlm.generate.request import check_model
from jaxlm.pretrained import from_pretrained, resolve_dir
from jaxlm.retrieval import (BM25Retriever, DenseRetriever, HybridRetriever, Pipeline,
                             Template, chunk_documents, load)

INDEX = "index"


def index_dir(workdir: str) -> str:
  return os.path.join(workdir, INDEX)


def documents(data_cfg) -> tuple[list[str], list[str]]:
  """(texts, ids) of data.source's documents, cleaned and filtered as the corpus is."""
  opts = corpus.clean_options(data_cfg)
  texts, ids = [], []
  for doc in sources.iter_documents(data_cfg.source, text_key=data_cfg.text_key,
                                    tfds_split=data_cfg.tfds_split):
    text = clean.clean_text(doc.text, opts)
    if clean.keep_document(text, opts):
      texts.append(text)
      ids.append(doc.doc_id)
  if not texts:
    raise ConfigError(f"data.source {data_cfg.source!r}: empty corpus (no document to index)")
  return texts, ids


def _generator_dir(cfg) -> str:
  return cfg.rag.generator or cfg.model.init_from


def build_index(cfg, workdir: str, *, fresh: bool = False, log=print) -> str:
  """Builds WORKDIR/index from data.source; returns its path."""
  experiment.check_values(cfg)
  r = cfg.rag
  out = index_dir(workdir)
  if os.path.exists(out) and not fresh:
    raise ConfigError(f"{out}: already holds an index; pass --fresh to build it again (the "
                      "old one is moved aside)")
  dense = None
  if r.retriever in ("dense", "hybrid"):
    if not r.encoder:
      raise ConfigError(f"rag.encoder: rag.retriever={r.retriever!r} needs an encoder "
                        "directory (e.g. a contrastive run's WORKDIR/model)")
    dense = DenseRetriever(resolve_dir(r.encoder), r.tokenizer or None, pooling=r.pooling)
  if dense is not None:
    tok = dense.tokenizer
  elif r.tokenizer or _generator_dir(cfg):
    tok = Tokenizer.load(resolve_dir(r.tokenizer or _generator_dir(cfg)))
  else:
    raise ConfigError("rag.tokenizer: chunk sizes are in tokens; set rag.tokenizer, "
                      "rag.generator or model.init_from to a directory with a tokenizer")
  texts, ids = documents(cfg.data)
  t0 = time.perf_counter()
  chunks = chunk_documents(texts, tok, r.chunk_tokens, r.chunk_overlap, doc_ids=ids,
                           max_tokens=dense.max_tokens if dense is not None else None)
  if r.retriever == "bm25":
    retriever = BM25Retriever()
  elif r.retriever == "dense":
    retriever = dense
  else:
    retriever = HybridRetriever(BM25Retriever(), dense)
  retriever.index(chunks)
  os.makedirs(workdir, exist_ok=True)
  tmp = out + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  retriever.save(tmp)
  if os.path.exists(out):  # --fresh: the old index is kept aside, never deleted
    os.replace(out, f"{out}.old-{time.strftime('%Y%m%d-%H%M%S')}")
  os.replace(tmp, out)
  log(f"index: {len(chunks):,} chunks of {len(texts):,} documents ({r.retriever}, "
      f"{r.chunk_tokens} tokens, overlap {r.chunk_overlap}) in "
      f"{time.perf_counter() - t0:.1f}s -> {out}")
  return out


def pipeline(cfg, workdir: str) -> Pipeline:
  """The Pipeline of --mode=rag: WORKDIR/index, the generator and the template."""
  experiment.check_values(cfg)
  directory = index_dir(workdir)
  if not os.path.isdir(directory):
    raise ConfigError(f"--mode=rag: no index in {directory}; build one first with "
                      "--mode=index")
  gen = _generator_dir(cfg)
  if not gen:
    raise ConfigError("rag.generator: --mode=rag needs a generator directory (or "
                      "model.init_from)")
  gen = resolve_dir(gen)
  retriever = load(directory)
  model = from_pretrained(gen, runtime=experiment.runtime(cfg))
  check_model(model)
  tok = Tokenizer.load(gen)
  template = Template.load(cfg.rag.template or None, tokenizer_dir=gen)
  g = cfg.generate
  return Pipeline(retriever, model, tok, template, k=cfg.rag.k,
                  max_new_tokens=g.max_new_tokens, stop=cfg.rag.stop or None,
                  **sampling_kwargs(g))


def run(cfg, workdir: str, *, prompt: str | None, prompts_file: str | None,
        output: str | None) -> None:
  if (prompt is None) == (prompts_file is None):
    raise ConfigError("--mode=rag needs exactly one of --prompt or --prompts_file")
  questions = [prompt] if prompt is not None else read_prompts(prompts_file)
  rag = pipeline(cfg, workdir)
  chunks = rag.retriever.chunks
  out = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
  try:
    bs = cfg.generate.batch_size
    bar = tqdm(total=len(questions), desc="rag", unit="prompt", file=sys.stderr,
               disable=len(questions) == 1)
    for start in range(0, len(questions), bs):
      for q, a in zip(questions[start:start + bs],
                      rag.answer_batch(questions[start:start + bs], batch_size=bs)):
        docs = [chunks[i].doc_id for i in a.passages] if chunks else None
        if prompt is not None and output is None:
          out.write(f"{a.text}\n[passages: {', '.join(map(str, a.passages)) or 'none'}"
                    + (f"; documents: {', '.join(map(str, docs))}" if docs else "") + "]\n")
        else:
          out.write(json.dumps({"prompt": q, "answer": a.text, "passages": list(a.passages),
                                "documents": docs}, ensure_ascii=False) + "\n")
      out.flush()
      bar.update(len(questions[start:start + bs]))
    bar.close()
  finally:
    if output:
      out.close()


def main(mode: str, cfg, workdir: str, *, fresh: bool, prompt: str | None,
         prompts_file: str | None, output: str | None) -> None:
  """--mode=index or --mode=rag (jaxlm/main.py)."""
  if mode == "index":
    build_index(cfg, workdir, fresh=fresh)
  else:
    run(cfg, workdir, prompt=prompt, prompts_file=prompts_file, output=output)
