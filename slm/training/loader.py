"""Deterministic batches: the data position is a pure function of the step.

The row stream is the concatenation of per-epoch permutations (seeded by (seed, epoch)). Global
batch k covers stream positions [k*G, (k+1)*G) with G = micro_batch * grad_accum * world; rank r
takes micro-batch m as positions [(m*world + r)*mb, ... + mb). Restoring a run therefore needs
only the step, and a resumed loader yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(eq=False)
class DeterministicLoader:
    source: object  # has __len__ and rows(indices, columns) -> dict of arrays
    micro_batch_size: int
    grad_accum: int
    rank: int
    world_size: int
    seed: int
    columns: tuple[str, ...]
    # per-loader cache of the last two epochs' permutations (a batch can straddle an epoch boundary)
    _perms: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            if len(self._perms) >= 2:
                del self._perms[next(iter(self._perms))]
            self._perms[epoch] = perm
        return perm

    def stream_indices(self, start: int, count: int) -> np.ndarray:
        n = len(self.source)
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // n):
            sel = positions // n == epoch
            out[sel] = self._permutation(int(epoch))[positions[sel] % n]
        return out

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The grad_accum micro-batches this rank trains on at optimizer step `step` (0-based)."""
        base = step * self.global_batch
        out = []
        for m in range(self.grad_accum):
            start = base + (m * self.world_size + self.rank) * self.micro_batch_size
            rows = self.source.rows(self.stream_indices(start, self.micro_batch_size), self.columns)
            out.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()})
        return out
