"""Decoder-only causal language models (GPT-2, Llama, Mistral, BLOOM, MPT, GPT-NeoX)."""

ARCHITECTURES: dict = {}
