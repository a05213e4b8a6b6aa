"""The OpenAI API's request bodies (pydantic: wrong types, unknown fields and out-of-range
numbers are errors, never defaults) and its response and error shapes."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Float = Annotated[float, Field(allow_inf_nan=False)]
MAX_N = 16
MAX_STOPS = 4


class _Body(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)

  model: StrictStr | None = None
  max_tokens: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None
  max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None
  temperature: Annotated[Float, Field(ge=0.0, le=2.0)] = 1.0
  top_p: Annotated[Float, Field(gt=0.0, le=1.0)] = 1.0
  top_k: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 0  # an extension (0: off)
  n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
  stop: StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                              Field(max_length=MAX_STOPS)] | None = None
  seed: Annotated[StrictInt, Field(ge=-(2**31), lt=2**31)] | None = None
  stream: StrictBool = False
  stream_options: dict[Literal["include_usage"], StrictBool] | None = None
  # Accepted at their neutral values only, so clients that always send them still work.
  presence_penalty: Annotated[Float, Field(ge=0.0, le=0.0)] = 0.0
  frequency_penalty: Annotated[Float, Field(ge=0.0, le=0.0)] = 0.0
  user: StrictStr | None = None

  def stops(self) -> list[str]:
    return [self.stop] if isinstance(self.stop, str) and self.stop else list(self.stop or [])


TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class CompletionRequest(_Body):
  """POST /v1/completions."""

  prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=64)] | \
      Annotated[TokenIds, Field(min_length=1)] | \
      Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1, max_length=64)]
  logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
  echo: Literal[False] = False


class Message(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)

  role: Literal["system", "user", "assistant", "developer"]
  content: StrictStr
  name: StrictStr | None = None


class ChatRequest(_Body):
  """POST /v1/chat/completions."""

  messages: Annotated[list[Message], Field(min_length=1, max_length=256)]
  logprobs: StrictBool = False
  top_logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None


def error(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> dict:
  """OpenAI's error body."""
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict], **extra) -> dict:
  """A response or stream chunk: kind is text_completion, chat.completion or
  chat.completion.chunk."""
  return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
          "choices": choices, **extra}
