"""The task registry: every objective is one module in jaxlm/tasks/, and nothing outside
that package knows objective names; the `sop` task proves a new one needs nothing else."""

import ast
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, fresh_workdir
from jaxlm import ConfigError, experiment, tasks
from jaxlm.data import pipeline

JAXLM = REPO / "jaxlm"


def test_registry_lists_every_objective_and_rejects_others():
  assert set(tasks.TASKS) == {"mlm", "nsp", "mlm+nsp", "sop", "causal", "span_corruption",
                              "classify", "token_classify", "extractive_qa", "sft", "distill",
                              "contrastive"}
  assert all(isinstance(t, tasks.Task) and t.name == n for n, t in tasks.TASKS.items())
  cfg = experiment.base_config()
  cfg.train.objective = "bogus"
  with pytest.raises(ConfigError, match=r"train.objective must be one of .*'sop'.*got 'bogus'"):
    experiment.validate(cfg)
  with pytest.raises(ValueError, match="registered twice"):
    tasks.register(type("Again", (tasks.TASKS["mlm"].__class__,), {"name": "mlm"}))


# Objective names, and the ways code used to branch on them (`objective == ...`,
# `... in objective`, `"nsp" in ...`).
_NAMES = {"mlm", "nsp", "mlm+nsp", "sop", "causal", "span_corruption"}


def _objective_branches(path):
  """(line, source) of comparisons in `path` that test an objective name or variable."""
  tree = ast.parse(path.read_text(), str(path))
  hits = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Compare):
      continue
    parts = [node.left, *node.comparators]
    names = [p.value for p in parts if isinstance(p, ast.Constant) and p.value in _NAMES]
    names += [e.value for p in parts if isinstance(p, (ast.Tuple, ast.List, ast.Set))
              for e in p.elts if isinstance(e, ast.Constant) and e.value in _NAMES]
    objective = any("objective" in ast.unparse(p) for p in parts)
    if names or objective:
      hits.append((node.lineno, ast.unparse(node)))
  return hits


def test_no_code_outside_tasks_branches_on_the_objective():
  found = {}
  for path in sorted(JAXLM.rglob("*.py")):
    if "tasks" in path.relative_to(JAXLM).parts:
      continue
    hits = _objective_branches(path)
    if hits:
      found[str(path.relative_to(REPO))] = hits
  assert not found, found
  # The checker itself catches the old shapes of the code.
  probe = REPO / "tests" / "_probe_objective.py"
  try:
    probe.write_text('def f(cfg, objective):\n  if objective == "causal": pass\n'
                     '  if "nsp" in cfg.train.objective: pass\n  if cfg.x in ("mlm", 1): pass\n')
    assert len(_objective_branches(probe)) == 3
  finally:
    probe.unlink()


def _imports(path, module):
  """Modules `path` imports (absolute, jaxlm.* only; function-level imports included)."""
  tree = ast.parse(path.read_text(), str(path))
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative
        base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
      for a in node.names:  # `from pkg import mod` imports pkg.mod when it is a module
        full = f"{base}.{a.name}"
        out.add(full if (REPO / (full.replace(".", "/") + ".py")).exists()
                or (REPO / full.replace(".", "/")).is_dir() else base)
  return {m for m in out if m == "jaxlm" or m.startswith("jaxlm.")}


def test_no_import_cycles_and_hf_models_apart():
  graph = {}
  for path in JAXLM.rglob("*.py"):
    rel = path.relative_to(REPO).with_suffix("")
    module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    graph[module] = _imports(path, module) - {module}
  # A package's own __init__ runs before its submodules anyway: an edge from a submodule
  # to its parent package is not a cycle through that submodule.
  for m in graph:
    graph[m] = {d for d in graph[m] if d in graph and not m.startswith(d + ".")}
  hf_to_models = {m: d for m in graph if m.startswith("jaxlm.hf") for d in graph[m]
                  if d.startswith(("jaxlm.models", "jaxlm.pretrained"))}
  models_to_hf = {m: d for m in graph if m.startswith("jaxlm.models") for d in graph[m]
                  if d.startswith(("jaxlm.hf", "jaxlm.pretrained"))}
  assert not hf_to_models and not models_to_hf, (hf_to_models, models_to_hf)
  state, stack = {}, []

  def visit(m):  # depth-first search for a back edge
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_size_limits():
  blocks = [p for sub in ("models", "layers") for p in (JAXLM / sub).glob("*.py")
            if re.search(r"^class \w*Block\b", p.read_text(), re.M)]
  assert [p.name for p in blocks] == ["block.py"]
  assert len(re.findall(r"^class \w*Block\b", (JAXLM / "models/block.py").read_text(),
                        re.M)) == 1
  long = {str(p.relative_to(REPO)): n for p in JAXLM.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > 600}
  assert not long, long
  assert len((JAXLM / "main.py").read_text().splitlines()) <= 100


# ---- sop: a new task through the unchanged loop -------------------------------------------
def test_sop_pairs_are_consecutive_segments_swapped_half_of_the_time(tmp_path, tiny_corpus):
  from jaxlm.data.corpus import prepare_corpus
  from jaxlm.tasks.sop import SentenceOrderPairs
  from configs import bert_sop
  cfg = bert_sop.get_config("tiny")
  corpus = prepare_corpus(cfg.data, cfg.tokenizer, str(fresh_workdir(tmp_path, tiny_corpus)
                                                          / "data"), log=lambda _: None)
  masked = tasks.get("sop").examples(corpus, "train", cfg.data, seed=0)
  ex = masked.transform(np.asarray(masked.source[0]), np.random.default_rng(0))
  assert ex["sop_weight"] == 1.0 and ex["masked_weights"].sum() > 0 and "nsp_label" not in ex
  # Without masking, the segments can be found verbatim in their document.
  s = corpus.splits["train"]
  chunks = s.chunks(cfg.data.max_seq_len - 3)
  builder = SentenceOrderPairs(s, chunks, pipeline.special_ids(corpus),
                               max_seq_len=cfg.data.max_seq_len, mask_prob=0.15, mlm=False)
  rng, labels = np.random.default_rng(0), []
  for row in chunks[:150]:
    ex = builder(row, rng)
    real, types = ex["attention_mask"] == 1, ex["token_type_ids"]
    a = ex["input_ids"][real & (types == 0)][1:-1].tolist()  # without [CLS] ... [SEP]
    b = ex["input_ids"][real & (types == 1)][:-1].tolist()
    if b == [corpus.tokenizer.sep_id] or a == [corpus.tokenizer.sep_id]:
      continue  # a document ending right at the cut
    # In order, A then B is the row's text verbatim from its first line on; swapped, B
    # then A is. B ends at a line end (else the mid-line cut would give the order away).
    first, second = (a, b) if ex["sop_label"] else (b, a)
    start = int(s.line_offsets[row[1]])
    assert s.tokens[start:start + len(first) + len(second)].tolist() == first + second
    end, room = start + len(first) + len(second), cfg.data.max_seq_len - 3
    assert end in set(s.line_offsets.tolist()) or len(first) + len(second) == room
    labels.append(int(ex["sop_label"]))
  assert len(labels) > 100 and 0.35 < np.mean(labels) < 0.65


def test_sop_trains_end_to_end_through_the_unchanged_loop(tmp_path, tiny_corpus):
  wd = fresh_workdir(tmp_path, tiny_corpus)
  r = subprocess.run([sys.executable, "-m", "jaxlm.main",
                      f"--config={REPO / 'configs/bert_sop.py'}:tiny", f"--workdir={wd}"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  train = [x for x in rows if "loss" in x]
  val = [x for x in rows if "val_loss" in x]
  assert train and all(0.0 <= x["sop_accuracy"] <= 1.0 for x in train)
  assert val and all("val_sop_accuracy" in x and "val_mlm_perplexity" in x for x in val)
  assert not any("nsp_accuracy" in k for x in rows for k in x)
  rep = json.loads((wd / "report.json").read_text())
  assert 0.0 <= rep["test_sop_accuracy"] <= 1.0
  assert len(rep["sop_samples"]) == 3
  for ex in rep["sop_samples"]:
    assert ex["a"] and ex["b"] and ex["label"] in (0, 1) and 0.0 <= ex["p"] <= 1.0
  assert rep["fill_mask"]
  assert "SOP accuracy" in r.stdout
