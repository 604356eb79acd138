"""Selective Language Modeling (RHO-1, Lin et al. 2024, sec. 2.2).

Excess loss of token t (RHO-1 eq. 1, "score"):
    excess_t = L_theta(x_t) - L_ref(x_t)
The selective loss keeps the top k% of tokens by excess loss (RHO-1 eq. 2):
    L_SLM = 1 / (N * k%) * sum_t I_k%(x_t) * L_theta(x_t)
where I_k% is 1 for the kept tokens. Here N counts *valid* tokens only: valid excludes padding,
masked positions and positions whose reference loss is NaN (position 0 of every row).

Modes decide the pool within which the top k% is taken:
    sequence  per row;   batch  per micro-batch (RHO-1's default);   global  across all
    data-parallel ranks (an all-gather of the excess scores);   soft  sigmoid weights around
    the batch's k% cut instead of a hard cut;   static  precomputed excess (base - ref loss
    from the shards), no online term.

Reference-free modes (ESLM, Bal, Cevher and Muehlebach 2025, arXiv 2505.19893, sec. 3): the score is the
student's own per-token risk, no reference loss enters, and the top k% per micro-batch is kept (ESLM's
value-at-risk cut at confidence alpha = 1 - k%; on the loss, the kept mean is its CVaR objective):
    self_loss     S_t = L_theta(x_t) = -log p_theta(x_t | x_<t)
    self_entropy  S_t = H_theta(x_t) = -sum_v p_theta(v | x_<t) log p_theta(v | x_<t)
Valid tokens there exclude padding, masked positions and position 0; a NaN reference loss does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from slm.config import SelectionConfig

REFERENCE_FREE = ("self_loss", "self_entropy")  # selection modes that read no reference loss


@dataclass
class Selection:
    loss: torch.Tensor  # the scalar to backpropagate
    weights: torch.Tensor  # [B, T] weight of each token in the loss (0/1 for hard modes)
    excess: torch.Tensor  # [B, T] the selection score: excess loss, or a reference-free mode's own score (NaN: invalid)
    valid: torch.Tensor  # [B, T] bool
    score_name: str = "excess"  # what `excess` holds: excess, or the reference-free mode (self_loss, self_entropy)

    @property
    def kept(self) -> torch.Tensor:
        """[B, T] bool: the valid tokens the loss keeps (a soft mode's weight above 1/2)."""
        return (self.weights > 0.5) & self.valid

    def stats(self, ce: torch.Tensor) -> dict[str, torch.Tensor]:
        """Kept fraction, mean score (`<score_name>_kept`, `_dropped`) and mean loss of kept and dropped tokens
        (NaN where there are none), as 0-dim tensors on ce's device: nothing waits for the device here (the
        training loop reads them once per logging interval)."""
        kept = self.kept
        dropped = ~kept & self.valid
        n_valid = self.valid.sum()

        def mean(x, m):  # 0 / 0 = NaN when m is empty
            return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum()

        return {
            "kept_fraction": kept.sum() / n_valid.clamp_min(1),
            f"{self.score_name}_kept": mean(self.excess, kept),
            f"{self.score_name}_dropped": mean(self.excess, dropped),
            "loss_kept": mean(ce.detach(), kept),
            "loss_dropped": mean(ce.detach(), dropped),
            "valid_tokens": n_valid,
        }

    def noise_measures(self, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """How the selection treats the demo's noise tags `noise` [B, T] (measurement only; never used to select):
        the share of noise tokens it drops and the share of kept tokens that are clean, as 0-dim tensors (read by
        the training loop once per logging interval)."""
        kept = self.kept
        is_noise = noise.bool() & self.valid
        clean_kept = kept & ~is_noise
        return {
            "noise_dropped": (is_noise & ~kept).sum() / is_noise.sum().clamp_min(1),
            "kept_clean": clean_kept.sum() / kept.sum().clamp_min(1),
        }


def valid_tokens(ce: torch.Tensor, ref_loss: torch.Tensor | None, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Finite loss (not position 0), finite reference loss unless `ref_loss` is None, and loss_mask set."""
    valid = torch.isfinite(ce)
    if ref_loss is not None:
        valid &= torch.isfinite(ref_loss)
    if loss_mask is not None:
        valid &= loss_mask.bool()
    return valid


def top_k_mask(scores: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the round(ratio * n_valid) highest `scores` among `valid` (last dim pooled)."""
    k = torch.round(valid.sum(-1, keepdim=True).double() * ratio).long()  # [..., 1]
    masked = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return (ranks < k) & valid


def _global_top_k(excess: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Top-k over the tokens of all ranks: gather every rank's scores, rank them together."""
    world, rank = dist.get_world_size(), dist.get_rank()
    flat = torch.where(valid, excess, torch.full_like(excess, float("-inf"))).reshape(-1).float()
    sizes = [torch.zeros(1, dtype=torch.long, device=flat.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([flat.numel()], device=flat.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), float("-inf"), device=flat.device)
    padded[: flat.numel()] = flat
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    pool = torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])
    pool_valid = torch.isfinite(pool)
    keep = top_k_mask(pool, pool_valid, ratio)
    start = int(sum(s.item() for s in sizes[:rank]))
    return keep[start : start + flat.numel()].view_as(excess)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def selective_loss(
    ce: torch.Tensor,
    ref_loss: torch.Tensor | None,
    cfg: SelectionConfig,
    loss_mask: torch.Tensor | None = None,
    base_loss: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> Selection:
    """RHO-1 selective loss from per-token `ce` [B, T] (with grad) and reference losses [B, T].

    The reference-free modes ignore `ref_loss` (None allowed); self_entropy needs the student's per-token
    predictive `entropy` [B, T] (`slm.models.token_loss.token_losses_and_entropy`)."""
    free = cfg.mode in REFERENCE_FREE
    valid = valid_tokens(ce, None if free else ref_loss, loss_mask)
    if cfg.mode == "self_loss":
        excess = ce.detach()  # ESLM's loss-based risk score
    elif cfg.mode == "self_entropy":
        if entropy is None:
            raise ValueError("selection.mode=self_entropy needs the student's per-token entropy")
        excess = entropy.detach()  # ESLM's entropy-based risk score
        valid &= torch.isfinite(excess)
    elif ref_loss is None:  # without scores only the plain causal LM runs (a corpus without shards)
        if cfg.enabled and cfg.ratio < 1.0:
            raise ValueError(f"selection.mode={cfg.mode} needs the reference loss (ref_loss)")
        excess = torch.full_like(ce.detach(), float("nan"))
    elif cfg.mode == "static":
        if base_loss is None:
            raise ValueError("selection.mode=static needs a base_loss column in the shards (score with base_model)")
        excess = base_loss - ref_loss
        valid &= torch.isfinite(base_loss)
    else:
        excess = ce.detach() - ref_loss  # RHO-1 eq. 1
    excess = torch.where(valid, excess, torch.full_like(excess, float("nan")))

    if not cfg.enabled or cfg.ratio >= 1.0:
        weights = valid.to(ce.dtype)
    elif cfg.mode == "sequence":
        weights = top_k_mask(excess, valid, cfg.ratio).to(ce.dtype)
    elif cfg.mode in ("batch", "static", *REFERENCE_FREE):
        weights = top_k_mask(excess.reshape(-1), valid.reshape(-1), cfg.ratio).view_as(ce).to(ce.dtype)
    elif cfg.mode == "global":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            weights = _global_top_k(excess, valid, cfg.ratio).to(ce.dtype)
        else:
            weights = top_k_mask(excess.reshape(-1), valid.reshape(-1), cfg.ratio).view_as(ce).to(ce.dtype)
    elif cfg.mode == "soft":
        # weight_t = sigmoid((excess_t - cut) / temperature), cut = the batch's top-k% threshold
        flat, fvalid = excess.reshape(-1), valid.reshape(-1)
        # nanquantile over the valid scores (no boolean indexing: no host sync); NaN when none is valid, and then
        # every weight is masked to 0 below
        cut = torch.nanquantile(torch.where(fvalid, flat, float("nan")).float(), 1.0 - cfg.ratio)
        weights = torch.sigmoid((excess - cut) / cfg.temperature)
        weights = torch.where(valid, weights, torch.zeros_like(weights)).to(ce.dtype)
    else:  # pragma: no cover - the config's Literal forbids it
        raise ValueError(f"unknown selection mode {cfg.mode!r}")

    safe_ce = torch.where(valid, ce, torch.zeros_like(ce))  # NaN * 0 would poison the gradient
    total_weight = weights.sum()
    if cfg.enabled and cfg.mode == "global":
        # mean over the kept tokens of *all* ranks; DeepSpeed averages gradients over ranks,
        # so scale by world size to get exactly the global mean
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        total_weight = _all_reduce_sum(total_weight.detach()) / world
    # no kept token: 0 / 1e-12 = 0 with zero gradients (safe_ce is finite), and no host sync to find out
    loss = (safe_ce * weights).sum() / total_weight.clamp_min(1e-12)
    return Selection(
        loss=loss, weights=weights.detach(), excess=excess, valid=valid, score_name=cfg.mode if free else "excess"
    )
