"""Retrieval-augmented generation: prompt templates fitted to the context window
(prompt.py)."""

from jaxlm.retrieval.prompt import Prompt, Template, fit_prompt

__all__ = ["Prompt", "Template", "fit_prompt"]
