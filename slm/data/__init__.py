"""Corpora (via `datasets`), tokenizers, packing, and the embedded demo corpus."""
