"""Does retrieval help? Quote completion on lines the generator never saw (issue 17, item 7).

  python benchmarks/rag_quotes.py --out benchmarks/results/rag-quotes-20261205.json

Steps, each as configs/rag.py's docstring runs it, skipped when its output exists:
  1. the generator: gpt2_small.py:rag, pretrained on the train split only (runs/rag_lm);
  2. the index: --mode=index over the whole corpus, test-split scenes included
     (runs/rag_index; BM25 over 32-token chunks);
  3. SFT data (runs/rag_quotes/sft.jsonl): for lines of at least MIN_WORDS words, the first
     half (by words) is the question and the second half the response; the prompt is the
     Pipeline's own (the passages BM25 retrieves for the first half, fitted to the
     context). Train-split lines train, validation-split lines validate;
  4. SFT (runs/rag_sft, configs/rag.py:sft);
  5. scoring: test-split lines through `jaxlm.retrieval.Pipeline` with retrieval and
     without it (the same generator and template, an empty context): exact match and
     ROUGE-L (rouge-score) of the generated second halves.
Prints JSON; --out writes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from behaviour import _cpu  # noqa: E402  (benchmarks/behaviour.py)
from common import jaxlm_cli, write_json  # noqa: E402

MIN_WORDS = 6
SPLITS = ("train", "validation", "test")


def quote_lines(data_dir: str, split: str) -> list[str]:
  """Lines of verse or prose of one split (speaker names and stage directions left out)."""
  out = []
  with open(os.path.join(data_dir, f"{split}.jsonl"), encoding="utf-8") as f:
    for row in f:
      for line in json.loads(row)["text"].split("\n"):
        line = line.strip()
        if (len(line.split()) >= MIN_WORDS and not line.isupper()
            and not line.startswith(("Enter ", "Exit", "Exeunt", "[", "SCENE", "ACT "))):
          out.append(line)
  return out


def halves(line: str) -> tuple[str, str]:
  words = line.split()
  return " ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])


def sample(lines: list[str], n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [lines[i] for i in sorted(rng.choice(len(lines), min(n, len(lines)), replace=False))]


def build_data(rag, data_dir: str, out_path: str, counts: dict[str, int]) -> dict:
  """sft.jsonl: RAG prompts for the first halves, the second halves as responses."""
  stats = {}
  with open(out_path + ".partial", "w", encoding="utf-8") as f:
    for s, split in enumerate(SPLITS):
      lines = sample(quote_lines(data_dir, split), counts[split], seed=s)
      firsts, seconds = zip(*(halves(x) for x in lines))
      prompts = rag.prompts(list(firsts))
      found = sum(second in " ".join(rag.passages[i] for i in ids).replace("\n", " ")
                  for second, (_, ids) in zip(seconds, prompts))
      for (prompt, _), second in zip(prompts, seconds):
        f.write(json.dumps({"prompt": prompt, "response": second, "split": split}) + "\n")
      stats[split] = {"lines": len(lines), "response_in_retrieved_passages": found / len(lines)}
  os.replace(out_path + ".partial", out_path)
  return stats


def score(rag, data_dir: str, n: int, lm=None, lm_tok=None) -> dict:
  from jaxlm.data.pipeline import end_of_document_id
  from jaxlm.evals import text
  from jaxlm.generate.text import complete
  lines = sample(quote_lines(data_dir, "test"), n, seed=2)
  firsts, seconds = zip(*(halves(x) for x in lines))
  out, examples = {}, []
  for name, retrieve in (("with_retrieval", True), ("without_retrieval", False)):
    t0 = time.perf_counter()
    answers = rag.answer_batch(list(firsts), retrieve=retrieve)
    preds = [a.text for a in answers]
    out[name] = {"exact_match": text.squad_scores(preds, list(seconds))["exact_match"],
                 "rougeL": text.rouge(preds, list(seconds), ("rougeL",))["rougeL"],
                 "seconds": round(time.perf_counter() - t0, 1)}
    examples.append(preds[:5])
  out["rougeL_ratio"] = out["with_retrieval"]["rougeL"] / max(
      out["without_retrieval"]["rougeL"], 1e-9)
  if lm is not None:  # a second baseline: the pretrained LM continues the first half itself,
    # cut to as many words as the first half has (the halves split a line by words)
    raw = complete(lm, lm_tok, list(firsts), eos=end_of_document_id(lm_tok),
                   max_new_tokens=rag.max_new_tokens, max_prompt=64, suffix="")
    preds = [" ".join(r.split()[:len(f.split())]) for r, f in zip(raw, firsts)]
    out["pretrained_lm_continuation"] = {
        "exact_match": text.squad_scores(preds, list(seconds))["exact_match"],
        "rougeL": text.rouge(preds, list(seconds), ("rougeL",))["rougeL"]}
    lm_examples = preds[:5]
  else:
    lm_examples = [None] * 5
  out["test_lines"] = len(lines)
  out["examples"] = [{"first_half": firsts[i], "reference": seconds[i],
                      "with_retrieval": examples[0][i], "without_retrieval": examples[1][i],
                      "pretrained_lm": lm_examples[i]}
                     for i in range(5)]
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lm", default="runs/rag_lm")
  p.add_argument("--index", default="runs/rag_index")
  p.add_argument("--data", default="runs/rag_quotes")
  p.add_argument("--sft", default="runs/rag_sft")
  p.add_argument("--train-lines", type=int, default=12000)
  p.add_argument("--eval-lines", type=int, default=300)
  p.add_argument("--test-lines", type=int, default=500)
  p.add_argument("--data-only", action="store_true", help="stop after step 3")
  p.add_argument("--out", default=None)
  a = p.parse_args()
  os.chdir(ROOT)
  out: dict = {"machine": _cpu()}
  if not os.path.isdir(os.path.join(a.lm, "model")):
    out["lm_wall_seconds"] = jaxlm_cli(["--config=configs/gpt2_small.py:rag",
                                        f"--workdir={a.lm}"], a.lm + ".log")
  if not os.path.isdir(os.path.join(a.index, "index")):
    out["index_wall_seconds"] = jaxlm_cli(
        ["--mode=index", "--config=configs/rag.py", f"--workdir={a.index}",
         f"--config.rag.tokenizer={a.lm}"], a.index + ".log")

  import jaxlm
  from jaxlm.retrieval import Pipeline, Template, load
  from configs import rag as rag_config
  cfg = rag_config.get_config()
  template = Template.load(cfg.rag.template)
  retriever = load(os.path.join(a.index, "index"))
  sft_path = os.path.join(a.data, "sft.jsonl")
  if not os.path.isfile(sft_path):
    os.makedirs(a.data, exist_ok=True)
    lm = jaxlm.from_pretrained(os.path.join(a.lm, "model"))
    rag = Pipeline(retriever, lm, jaxlm.load_tokenizer(os.path.join(a.lm, "model")), template,
                   k=cfg.rag.k, max_new_tokens=cfg.generate.max_new_tokens)
    out["data"] = build_data(rag, os.path.join(a.lm, "data"), sft_path,
                             {"train": a.train_lines, "validation": a.eval_lines,
                              "test": a.eval_lines})
  if a.data_only:
    print(json.dumps(out, indent=2))
    return
  if not os.path.isdir(os.path.join(a.sft, "model")):
    out["sft_wall_seconds"] = jaxlm_cli(
        ["--mode=finetune", "--config=configs/rag.py:sft", f"--workdir={a.sft}",
         f"--config.model.init_from={a.lm}", f"--config.data.source={sft_path}"],
        a.sft + ".log")
  with open(os.path.join(a.sft, "report.json"), encoding="utf-8") as f:
    rep = json.load(f)
  out["sft"] = {k: rep.get(k) for k in ("steps", "val_loss", "test_loss", "train_seconds",
                                         "test_generated_exact_match",
                                         "test_generated_rougeL")}
  gen = jaxlm.from_pretrained(os.path.join(a.sft, "model"))
  rag = Pipeline(retriever, gen, jaxlm.load_tokenizer(os.path.join(a.sft, "model")), template,
                 k=cfg.rag.k, max_new_tokens=cfg.generate.max_new_tokens)
  lm_dir = os.path.join(a.lm, "model")
  out["quote_completion"] = score(rag, os.path.join(a.lm, "data"), a.test_lines,
                                 jaxlm.from_pretrained(lm_dir), jaxlm.load_tokenizer(lm_dir))
  out["acceptance"] = {"rag_rougeL_at_least_2x_no_retrieval":
                       out["quote_completion"]["rougeL_ratio"] >= 2.0}
  text = json.dumps(out, indent=2)
  print(text)
  write_json(text, a.out, out_name="rag-quotes.json")


if __name__ == "__main__":
  main()
