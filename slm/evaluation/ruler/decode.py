"""Greedy decoding of one long prompt on any causal LM that `AutoModelForCausalLM` loads.

The prompt goes in chunks of `chunk_len` tokens with the model's cache carried from chunk to
chunk (a transformers `DynamicCache` for Llama; an slm backbone's bounded recurrent state), so
memory for activations stays that of one chunk; then tokens are generated one at a time.
transformers >= 5.2x names the cache argument `cache` (with `past_key_values` deprecated); slm
backbones take `past_key_values`. `cache_argument` picks whichever the model's forward declares.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from functools import cache

import torch


@cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_argument(model) -> str:
    params = _forward_params(type(model))
    if "cache" in params and "past_key_values" not in params:
        return "cache"
    return "past_key_values"


def _returned_cache(out):
    """The cache a forward returned: `out.cache` (transformers >= 5.2x) or `out.past_key_values`."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.inference_mode()
def greedy_generate(
    model,
    input_ids,
    max_new_tokens: int,
    chunk_len: int,
    stop_token_ids: Iterable[int] = (),
) -> list[int]:
    """Greedy continuation of `input_ids` (1-D, or shape [1, T]).

    Returns the generated ids; the stop token (EOS, newline, ...) that ended generation is the
    last one, as in `model.generate`. Stops after `max_new_tokens`.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be one non-empty sequence, got shape {tuple(ids.shape)}")
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    if max_new_tokens < 1:
        return []
    device = next(model.parameters()).device
    ids = ids.to(device)
    stops = {int(t) for t in stop_token_ids}
    cache_kw = cache_argument(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(type(model)) else {}

    cache = None
    logits = None
    for start in range(0, ids.shape[1], chunk_len):
        out = model(input_ids=ids[:, start : start + chunk_len], use_cache=True, **{cache_kw: cache}, **extra)
        cache = _returned_cache(out)
        logits = out.logits[:, -1]

    generated: list[int] = []
    while True:
        token = int(logits.argmax(dim=-1)[0])
        generated.append(token)
        if token in stops or len(generated) >= max_new_tokens:
            return generated
        step = torch.tensor([[token]], dtype=torch.long, device=device)
        out = model(input_ids=step, use_cache=True, **{cache_kw: cache}, **extra)
        cache = _returned_cache(out)
        logits = out.logits[:, -1]


def stop_token_ids(tokenizer, newline: bool = True) -> list[int]:
    """EOS, and with `newline` every token whose text contains a newline (answers are one line)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not newline:
        return sorted(ids)
    texts = tokenizer.batch_decode(
        [[t] for t in range(len(tokenizer))], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    ids.update(t for t, text in enumerate(texts) if "\n" in text)
    return sorted(ids)


def clean_prediction(text: str, first_line: bool = True) -> str:
    """The generated text, stripped; with `first_line` only its first non-empty line."""
    text = text.strip()
    return text.split("\n", 1)[0].strip() if first_line else text
