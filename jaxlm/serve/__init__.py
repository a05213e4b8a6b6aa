"""Serving: `python -m jaxlm.serve --model=DIR` runs an OpenAI-compatible HTTP server
(app.py, on Starlette and uvicorn) over a continuous-batching engine (engine.py)."""

from jaxlm.serve.engine import Engine, Event, Request

__all__ = ["Engine", "Event", "Request"]
