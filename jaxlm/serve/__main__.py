"""`python -m jaxlm.serve --model=DIR`: an OpenAI-compatible server on 127.0.0.1:8000.

DIR is a training workdir (its export, DIR/model, is served), a jaxlm export or a Hugging
Face directory, with its tokenizer. SIGTERM (or Ctrl-C) stops taking connections, lets
running requests finish for --grace seconds, cancels the rest and exits 0.

  python -m jaxlm.serve --model=runs/gpt2 --slots=16 --api_key=secret
  curl http://127.0.0.1:8000/v1/completions -H "Authorization: Bearer secret" \\
    -H "Content-Type: application/json" -d '{"prompt": "ROMEO:", "max_tokens": 32}'
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from jaxlm.cli import fail, one_line, tune_malloc
from jaxlm.errors import ConfigError, DataError


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m jaxlm.serve", description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="workdir, jaxlm export or HF directory")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--slots", type=int, default=16, help="requests decoded together")
  p.add_argument("--max_len", type=int, default=None,
                 help="tokens per slot, prompt and output (default: the model's context)")
  p.add_argument("--max_queue", type=int, default=256,
                 help="requests waiting for a slot; more get 429")
  p.add_argument("--quantize", choices=("int8", "int4", "bf16"), default=None)
  p.add_argument("--quantize_group_size", type=int, default=128)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default float32)")
  p.add_argument("--api_key", default=os.environ.get("JAXLM_API_KEY"),
                 help="require 'Authorization: Bearer KEY' (default: $JAXLM_API_KEY)")
  p.add_argument("--grace", type=float, default=10.0,
                 help="seconds running requests get to finish at shutdown")
  p.add_argument("--max_body", type=int, default=1 << 20, help="request body limit, bytes")
  p.add_argument("--model_name", default=None, help="the id /v1/models reports")
  p.add_argument("--log_level", default="info")
  return p.parse_args(argv)


def build(args):
  """(app, model name) for the parsed flags."""
  from jaxlm.generate.cli import open_model  # noqa: PLC0415 (after argparse: fast --help)
  from jaxlm.config import Runtime  # noqa: PLC0415
  from jaxlm.retrieval.prompt import read_chat_template  # noqa: PLC0415
  from jaxlm.serve.app import create_app  # noqa: PLC0415
  from jaxlm.serve.engine import Engine  # noqa: PLC0415
  directory = args.model
  if os.path.isdir(os.path.join(directory, "model")):  # a training workdir
    directory = os.path.join(directory, "model")
  if not os.path.isdir(directory):
    raise DataError(f"--model: {args.model} is not a directory")
  model, tok = open_model(directory, runtime=Runtime(dtype=args.dtype or "float32"), quantize=args.quantize,
                          group_size=args.quantize_group_size, flag="--quantize")
  engine = Engine(model, slots=args.slots, max_len=args.max_len, max_queue=args.max_queue)
  name = args.model_name or os.path.basename(os.path.abspath(args.model))
  app = create_app(engine, tok, model_name=name, api_key=args.api_key or None,
                   chat_template=read_chat_template(directory), max_body=args.max_body,
                   grace=args.grace)
  return app, name


def main(argv=None) -> None:
  args = parse(sys.argv[1:] if argv is None else argv)
  tune_malloc()
  import uvicorn  # noqa: PLC0415
  try:
    app, _ = build(args)
  except (ConfigError, DataError, OSError) as e:
    fail(one_line(e))
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                          timeout_graceful_shutdown=args.grace, access_log=False)
  # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler
  # turns that into a normal exit (status 0) after the drain.
  signal.signal(signal.SIGTERM, lambda *_: None)
  uvicorn.Server(config).run()


if __name__ == "__main__":
  main()
