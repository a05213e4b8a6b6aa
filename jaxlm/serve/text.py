"""Tokens to text as they come: what a stream may show so far, and where a stop string
ends the completion.

Text is shown only once it is final: a trailing incomplete UTF-8 character (decoded as
U+FFFD) waits for its next token, and so does a tail that may be the start of a stop
string, so that a stop string is never partly streamed. A non-streamed answer is built
from the same deltas, so both give the same text.
"""

from __future__ import annotations


class Detokenizer:
  def __init__(self, tokenizer, stops: list[str] = ()):
    self.tok, self.stops = tokenizer, [s for s in stops if s]
    self.tokens: list[int] = []
    self.shown = ""
    self.finished = False

  def _text(self) -> tuple[str, bool]:
    """The whole text so far, cut before the first stop string (and whether one was met)."""
    text = self.tok.decode(self.tokens)
    cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)

  def _held(self, text: str) -> int:
    """How many trailing characters must wait for more tokens."""
    held = 0
    for s in self.stops:  # the longest tail that begins a stop string
      for n in range(min(len(s) - 1, len(text)), held, -1):
        if text.endswith(s[:n]):
          held = n
          break
    if text.endswith("\ufffd"):
      held = max(held, len(text) - len(text.rstrip("\ufffd")))
    return held

  def _advance(self, text: str) -> str:
    if not text.startswith(self.shown):  # the tokenizer rewrote shown text: keep it
      return ""
    delta, self.shown = text[len(self.shown):], text
    return delta

  def push(self, token: int) -> tuple[str, bool]:
    """Adds a token; returns (newly final text, whether a stop string ended it)."""
    self.tokens.append(token)
    text, stopped = self._text()
    if stopped:
      self.finished = True
      return self._advance(text), True
    held = self._held(text)
    return self._advance(text[:len(text) - held]), False

  def finish(self) -> str:
    """The rest of the text at the end (held tails included)."""
    if self.finished and self.shown == self._text()[0]:
      return ""
    self.finished = True
    return self._advance(self._text()[0])
