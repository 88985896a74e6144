"""Interoperability: Hugging Face and GGUF checkpoints in and out."""
