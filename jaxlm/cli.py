"""What the command-line entry points share: user errors as one `error:` line and exit
status 2 (never a traceback), including errors in --config.a.b=value overrides."""

import ctypes
import sys

from absl import flags


def fail(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def one_line(e: BaseException) -> str:
  msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
  msg = msg.strip().replace("\\n", " ").replace("\n", " ")
  if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":  # a quoted KeyError message
    msg = msg[1:-1]
  return msg


def parse_flags(argv):
  """absl's flags parser with one-line errors (pass as app.run(flags_parser=...))."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(one_line(e))
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # from config overrides
    fail(f"config override: {one_line(e)}")


def tune_malloc() -> None:
  """glibc malloc without per-allocation mmap or trimming: XLA:CPU's step buffers
  otherwise cost ~100k page faults a step (docs/performance.md#memory-and-allocator)."""
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # not glibc
    return
  for option, value in ((-8, 1), (-4, 0), (-1, 2**31 - 1), (-2, 256 << 20)):
    libc.mallopt(option, value)  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD, M_TOP_PAD
