"""Scoring the rows of shards (`slm score`): each token's loss under the reference (and optional base) model, in
bounded memory, as batches for the ShardWriter.

With k > 1 references, reference i's losses L_i[t] are kept (column ref_loss_<i>) and `ref_loss` is their
combination (`score.combine`), over the set R(t) of references that enter token t:
    max             ref_loss[t] = max_{i in R(t)} L_i[t]          R(t) = all references
    mean            ref_loss[t] = (1/k) sum_{i in R(t)} L_i[t]    R(t) = all references
    min_per_domain  ref_loss[t] = min_{i in R(t)} L_i[t]          R(t) = {i : domain_i = D(d(t)) or domain_i unset}
where d(t) is the document holding token t and D(d) its domain (the corpus column `score.domain_field`). max is
the cautious rule (a token counts as learnable only if every reference finds it so, so its excess is the smallest);
mean averages them out; min_per_domain lets the references that know the document's domain vouch for it, any one of
them sufficing, and keeps the others (a code reference on a legal text) out. A NaN from any reference in R(t) makes
ref_loss[t] NaN: the token is then never selected. With one reference ref_loss is its losses, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from slm.config import ReferenceModel
from slm.data.packing import PackedRow, token_documents
from slm.errors import SlmError
from slm.models.token_loss import token_losses
from slm.utils.io import sha256_json, weights_fingerprint

COMBINE_RULES = ("max", "mean", "min_per_domain")


def masked_losses(model, x: torch.Tensor, mask: np.ndarray, chunk_tokens: int) -> np.ndarray:
    """float32 [B, T] per-token losses of `model` on `x` (slm.models.token_loss alignment), NaN where `mask` is 0."""
    loss = token_losses(model, x, chunk_tokens).float().cpu().numpy()
    loss[mask == 0] = np.nan
    return loss


def combine_losses(losses: np.ndarray, rule: str, enters: np.ndarray | None = None) -> np.ndarray:
    """`ref_loss` [B, T] from k references' losses [k, B, T] by `rule` (the equations above); `enters` [k, B, T]
    says which references enter each token (min_per_domain; None: all). float32 like the inputs; a token no
    reference enters is NaN."""
    if rule not in COMBINE_RULES:
        raise ValueError(f"combine {rule!r}: expected one of {', '.join(COMBINE_RULES)}")
    if rule == "max":
        return losses.max(axis=0)  # NaN propagates
    if rule == "mean":
        return losses.astype(np.float64).mean(axis=0).astype(np.float32)
    enters = np.ones(losses.shape, dtype=bool) if enters is None else enters
    out = np.where(enters, losses, np.float32(np.inf)).min(axis=0)  # NaN among the entering propagates
    out[~enters.any(axis=0)] = np.nan
    return out.astype(np.float32)


@dataclass
class ReferenceSet:
    """The reference models of one scoring run and how their losses make `ref_loss`.

    With min_per_domain, each row carries `extras["enters"]`, a bool [k, seq_len] array: which references enter
    each of its tokens (the stage derives it from the documents' domains)."""

    models: list
    combine: str = "max"

    def losses(self, x: torch.Tensor, mask: np.ndarray, chunk_tokens: int, batch: list[PackedRow]) -> dict:
        """`ref_loss` (and with several references ref_loss_<i>) of the token batch `x`, NaN where `mask` is 0."""
        each = [masked_losses(model, x, mask, chunk_tokens) for model in self.models]
        if len(each) == 1:
            return {"ref_loss": each[0]}
        enters = None
        if self.combine == "min_per_domain" and "enters" in batch[0].extras:
            enters = np.stack([r.extras["enters"] for r in batch], axis=1)  # [k, B, T]
        out = {"ref_loss": combine_losses(np.stack(each), self.combine, enters)}
        out.update({f"ref_loss_{i}": loss for i, loss in enumerate(each)})
        return out


def uses_domains(specs: list[ReferenceModel], combine: str) -> bool:
    """Whether the documents' domains decide which references enter (min_per_domain with a declared domain)."""
    return combine == "min_per_domain" and any(s.domain is not None for s in specs)


def entering_references(specs: list[ReferenceModel], domains: list) -> np.ndarray:
    """[documents, k] bool: reference i enters document j's tokens when its domain is unset or is str(domains[j])
    (a document whose domain is None is entered by the references without a domain only)."""
    declared = [s.domain for s in specs]
    rows = [[d is None or (v is not None and d == str(v)) for d in declared] for v in domains]
    return np.array(rows, dtype=bool).reshape(len(domains), len(specs))


def check_domains(corpus, specs: list[ReferenceModel], domain_field: str, where: str) -> None:
    """Every document's domain is entered by some reference, before any scoring: else one SlmError naming the
    domains no reference declares."""
    if domain_field not in corpus.column_names:
        raise SlmError(
            f"{where}: no column {domain_field!r} (score.domain_field), which combine=min_per_domain reads the "
            f"documents' domains from; its columns: {', '.join(corpus.column_names)}"
        )
    values = corpus.unique(domain_field)
    lost = [v for v, entered in zip(values, entering_references(specs, values).any(axis=1)) if not entered]
    if lost:
        declared = sorted({s.domain for s in specs if s.domain is not None})
        raise SlmError(
            f"{where}: documents of {domain_field} {', '.join(repr(v) for v in sorted(lost, key=str)[:5])} have no "
            f"reference: the references declare the domains {declared} and none is general (without a domain); add "
            "a reference for them or one without a domain"
        )


def with_entering_references(rows: Iterable[PackedRow], first: int, enters: np.ndarray) -> Iterator[PackedRow]:
    """`rows` packed from documents first, first + 1, ... with `extras["enters"]` [k, seq_len]: per token the
    references that enter it, those of its document (`enters`: [documents, k] from `entering_references`);
    padding: all (its losses are NaN anyway)."""
    for row, documents in token_documents(rows, first):
        per_token = np.ones((len(documents), enters.shape[1]), dtype=bool)
        real = documents >= 0
        per_token[real] = enters[documents[real] - first]
        row.extras["enters"] = per_token.T
        yield row


def reference_metadata(specs: list[ReferenceModel], models: list, combine: str, domain_field: str) -> dict:
    """The ShardMetadata keys that name the reference(s): one reference as always; several as a set, with each
    one's model, weights sha256, domain and sizes in `references` (format.ShardMetadata)."""

    def sizes(model) -> tuple[int | None, list[int]]:
        return getattr(model.config, "vocab_size", None), list(model.get_input_embeddings().weight.shape)

    vocab, shape = sizes(models[0])
    keys = {"reference_vocab_size": vocab, "reference_embedding_shape": shape}
    if len(specs) == 1:
        return {"reference_model": str(specs[0].path), "reference_sha256": weights_fingerprint(specs[0].path), **keys}
    field = domain_field if uses_domains(specs, combine) else None
    refs = [
        {
            "model": str(spec.path),
            "sha256": weights_fingerprint(spec.path),
            "domain": spec.domain,
            **dict(zip(("vocab_size", "embedding_shape"), sizes(model))),
        }
        for spec, model in zip(specs, models)
    ]
    identity = {"combine": combine, "domain_field": field, "references": [[r["sha256"], r["domain"]] for r in refs]}
    return {
        "reference_model": f"{combine}({', '.join(r['model'] for r in refs)})",
        "reference_sha256": sha256_json(identity),
        **keys,
        "references": refs,
        "combine": combine,
        "domain_field": field,
    }


def _batched(rows: Iterable[PackedRow], size: int) -> Iterator[list[PackedRow]]:
    batch: list[PackedRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def score_rows(
    rows: Iterable[PackedRow],
    reference,
    batch_size: int,
    chunk_tokens: int,
    first_sequence_id: int,
    base=None,
    device: torch.device = torch.device("cpu"),
    on_tokens=None,
) -> Iterator[dict]:
    """Batches ready for ShardWriter: ids, masks, document starts, reference (and base) losses.

    `reference` is a model or a ReferenceSet (several models and their combination rule).
    Padding positions get NaN losses like position 0: they have no valid score.
    """
    references = reference if isinstance(reference, ReferenceSet) else ReferenceSet([reference])
    next_id = first_sequence_id
    for batch in _batched(rows, batch_size):
        ids = np.array([r.input_ids for r in batch], dtype=np.int32)
        mask = np.array([r.loss_mask for r in batch], dtype=np.int8)
        x = torch.from_numpy(ids).long().to(device)
        out = {
            "sequence_id": np.arange(next_id, next_id + len(batch), dtype=np.int64),
            "input_ids": ids,
            "loss_mask": mask,
            "doc_starts": [r.doc_starts for r in batch],
        }
        out.update(references.losses(x, mask, chunk_tokens, batch))
        if base is not None:
            out["base_loss"] = masked_losses(base, x, mask, chunk_tokens)
        if batch[0].noise is not None:
            out["noise"] = np.array([r.noise for r in batch], dtype=np.int8)
        next_id += len(batch)
        if on_tokens is not None:
            on_tokens(int(mask.sum()))
        yield out
