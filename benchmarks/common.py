"""What the benchmark scripts share: writing their JSON where it was asked for."""

import os


def write_json(text: str, *paths: str | None, out_name: str | None = None) -> list[str]:
  """Writes `text` to each given path and, when the environment sets OUT (the device
  runner's output folder), to $OUT/out_name; returns the paths written."""
  targets = [p for p in paths if p]
  if out_name and os.environ.get("OUT"):
    targets.append(os.path.join(os.environ["OUT"], out_name))
  for path in targets:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return targets
