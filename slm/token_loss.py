"""Per-token cross-entropy, aligned the way the shards store it, without full logits.

Alignment (the one place it is defined): for a row x_0..x_{T-1},
    loss[t] = -log p(x_t | x_<t)   for t >= 1,      loss[0] = NaN   (no context).
The output projection runs over chunks of at most `chunk_tokens` positions, so a
batch x sequence x vocabulary tensor of fp32 logits never exists whole (a 128K vocabulary fits).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_nll(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    # through the module (not F.linear on its weight) so that ZeRO-3 gathers the partitioned weight
    logits = lm_head(hidden).float()
    # -log softmax(logits)[target] = logsumexp(logits) - logits[target]
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)


def hidden_states(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Final (normed) hidden states of a causal LM: the input of its output projection."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state


def token_losses_from_hidden(
    hidden: torch.Tensor, lm_head: torch.nn.Module, input_ids: torch.Tensor, chunk_tokens: int = 8192
) -> torch.Tensor:
    """[B, T] losses (NaN at t=0) from hidden states [B, T, H]; chunked over the B*(T-1) predictions."""
    B, T, H = hidden.shape
    flat_h = hidden[:, :-1].reshape(-1, H)  # hidden at t-1 predicts token t
    flat_y = input_ids[:, 1:].reshape(-1)
    pieces = []
    for start in range(0, flat_h.shape[0], chunk_tokens):
        h, y = flat_h[start : start + chunk_tokens], flat_y[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            # recompute the chunk's logits in backward instead of storing them
            pieces.append(checkpoint(_chunk_nll, h, lm_head, y, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(h, lm_head, y))
    nll = torch.cat(pieces).view(B, T - 1) if pieces else hidden.new_zeros(B, 0, dtype=torch.float32)
    return torch.cat([torch.full((B, 1), float("nan"), dtype=nll.dtype, device=nll.device), nll], dim=1)


def token_losses(model, input_ids: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    return token_losses_from_hidden(
        hidden_states(model, input_ids), model.get_output_embeddings(), input_ids, chunk_tokens
    )
