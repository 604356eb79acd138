"""Per-token cross-entropy, aligned the way the shards store it, without full logits.

Alignment (the one place it is defined): for a row x_0..x_{T-1},
    loss[t] = -log p(x_t | x_<t)   for t >= 1,      loss[0] = NaN   (no context).
The output projection runs over chunks of at most `chunk_tokens` positions, so a
batch x sequence x vocabulary tensor of fp32 logits never exists whole (a 128K vocabulary fits):
with more than one chunk, each chunk's logits are recomputed in backward instead of stored.
When every prediction fits in one chunk, that chunk is the whole bound already, so it is kept for
backward and not recomputed. The recompute is a second output-projection matmul: for the demo's
1M-parameter model (hidden 128, vocabulary 2,048) 2 x 2,040 x 128 x 2,048 = 1.07 GFLOP of a step's
~17 GFLOP at 8 x 256 tokens, 6%.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_nll(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, entropy: bool = False):
    # through the module (not F.linear on its weight) so that ZeRO-3 gathers the partitioned weight
    logits = lm_head(hidden).float()
    lse = torch.logsumexp(logits, dim=-1)
    # -log softmax(logits)[target] = logsumexp(logits) - logits[target]
    nll = lse - logits.gather(-1, targets[:, None]).squeeze(-1)
    if not entropy:
        return nll
    with torch.no_grad():  # a selection score, never differentiated
        # H = -sum_v p_v log p_v = logsumexp(logits) - sum_v p_v logits_v
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return nll, ent


def hidden_states(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Final (normed) hidden states of a causal LM: the input of its output projection."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state


def token_losses_from_hidden(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    input_ids: torch.Tensor,
    chunk_tokens: int = 8192,
    entropy: bool = False,
):
    """[B, T] losses (NaN at t=0) from hidden states [B, T, H]; chunked over the B*(T-1) predictions.

    With `entropy`, also the [B, T] entropy of each prediction (aligned the same way, NaN at t=0, no gradient),
    from the same chunk of logits: (losses, entropies)."""
    B, T, H = hidden.shape
    flat_h = hidden[:, :-1].reshape(-1, H)  # hidden at t-1 predicts token t
    flat_y = input_ids[:, 1:].reshape(-1)
    pieces, chunks = [], -(-flat_h.shape[0] // chunk_tokens)
    for start in range(0, flat_h.shape[0], chunk_tokens):
        h, y = flat_h[start : start + chunk_tokens], flat_y[start : start + chunk_tokens]
        if chunks > 1 and torch.is_grad_enabled() and h.requires_grad:
            # recompute the chunk's logits in backward instead of storing them
            piece = checkpoint(_chunk_nll, h, lm_head, y, entropy, use_reentrant=False)
        else:
            piece = _chunk_nll(h, lm_head, y, entropy)
        pieces.append(piece if entropy else (piece,))

    def aligned(values: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(values).view(B, T - 1) if values else hidden.new_zeros(B, 0, dtype=torch.float32)
        return torch.cat([torch.full((B, 1), float("nan"), dtype=x.dtype, device=x.device), x], dim=1)

    nll = aligned([p[0] for p in pieces])
    return (nll, aligned([p[1] for p in pieces])) if entropy else nll


def token_losses(model, input_ids: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    return token_losses_from_hidden(
        hidden_states(model, input_ids), model.get_output_embeddings(), input_ids, chunk_tokens
    )


def token_losses_and_entropy(
    model, input_ids: torch.Tensor, chunk_tokens: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_losses` and, from the same logits, each prediction's entropy H_t = -sum_v p(v | x_<t) log p(v | x_<t)
    (NaN at t=0; detached: the score of selection.mode=self_entropy)."""
    return token_losses_from_hidden(
        hidden_states(model, input_ids), model.get_output_embeddings(), input_ids, chunk_tokens, entropy=True
    )
