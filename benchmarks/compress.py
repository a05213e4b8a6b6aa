"""Compression benchmarks (issue 15), one JSON document: quantization, pruning,
distillation and speculative decoding, each section from its own script run in a fresh
process (so one section's compiled programs and memory do not slow the next).

  python benchmarks/compress.py [--quick] [--only quant,prune,distill,spec] [--out FILE]

Sections and what they need:
  quant    benchmarks/compress_quant.py    runs/compress_teacher (configs/gpt2_small.py:mini)
  prune    benchmarks/compress_prune.py    runs/compress_teacher
  distill  benchmarks/compress_distill.py  runs/compress_teacher; trains the students
  spec     benchmarks/compress_spec.py     runs/spec_teacher (gpt2_small.py:medium) and its
                                           distilled draft runs/spec_student
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("quant", "prune", "distill", "spec")


from common import write_json  # noqa: E402 (benchmarks/common.py)


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def section(name: str, quick: bool) -> dict:
  """The JSON document a section's script prints (its last top-level object)."""
  cmd = [sys.executable, os.path.join(HERE, f"compress_{name}.py")] + (["--quick"] if quick
                                                                        else [])
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
  text = proc.stdout
  return json.loads(text[text.index("{"):])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--only", default=",".join(SECTIONS))
  ap.add_argument("--out")
  a = ap.parse_args()
  names = [s for s in a.only.split(",") if s]
  unknown = sorted(set(names) - set(SECTIONS))
  if unknown:
    sys.exit(f"--only: unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
  doc = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(),
         "cpus": os.cpu_count(), "quick": a.quick}
  for name in names:
    doc[name] = section(name, a.quick)
  text = json.dumps(doc, indent=1)
  print(text)
  write_json(text, a.out)


if __name__ == "__main__":
  main()
