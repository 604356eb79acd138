"""Corpora (via `datasets`), tokenizers, packing, the embedded demo corpus and the real-text corpus."""
