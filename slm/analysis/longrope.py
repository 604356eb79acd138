"""LongRoPE rescale-factor search (Ding et al. 2024, "LongRoPE: Extending LLM Context Window Beyond
2 Million Tokens", arXiv:2402.13753, sec. 3.2 and Algorithm 1).

RoPE rotates the i-th pair of a head (i < d/2) at position n by the angle n * theta_i with
theta_i = base^(-2i/d). LongRoPE rescales each pair by its own factor lambda_i (paper Eq. 3, with
n_hat = 0):

    angle_i(n) = n * theta_i / lambda_i                                   (LongRoPE Eq. 3)

and searches lambda = (lambda_0 .. lambda_{d/2-1}) for an extension ratio s = L'/L
(target length over original length) by an evolutionary search whose fitness is perplexity on
samples of length L' (Algorithm 1):

    P_0 = PI, NTK and YaRN factors + their mutations               (sec. 3.2 "optimized initial population")
    for t in 1..T:
        top_k      = the k lowest-perplexity individuals so far
        P_mutation = Mutation_with_mono_constraint(top_k, N1, p)
        P_crossover= Crossover_with_mono_constraint(top_k, N2)
        P_t        = P_mutation U P_crossover U top_k
    return the lowest-perplexity individual of top_k

with the monotone constraint lambda_i <= lambda_{i+1} (sec. 3.2 "monotonically non-decreasing
constraint") and the search space lambda_i in [1.0, 1.25 * s] on a 0.01 grid (Table 1).

Choices made here (documented divergences):
- n_hat (keep the first n_hat positions un-rotated-rescaled) is **not** searched: transformers'
  `longrope` rope type (the Phi-3 form that `ModelConfig.rope_scaling` deploys) has no n_hat, so a
  searched n_hat could not be deployed. This is the paper's n_hat = 0.
- Fitness runs the model through transformers' own `longrope` code: for every candidate the
  model's rotary module is rebuilt from a copy of its config with
  `rope_parameters = {rope_type: longrope, long_factor: lambda, ...}` and swapped in for the
  duration of the evaluation. The perplexity that the search reports is therefore exactly what a
  model built from `longrope_rope_scaling(result)` computes (a test checks this).
- Mutation follows the official implementation (microsoft/LongRoPE, evolution/algorithms/dim_mono.py):
  each lambda_i is, with probability p, redrawn on the grid between its neighbours
  [lambda_{i-1}, lambda_{i+1}], so children satisfy the monotone constraint by construction.
  Crossover takes each lambda_i from either parent with probability 1/2 and rejects children that
  break the constraint (retrying, then falling back to a mutation of the better parent).
- The attention factor is fixed, not searched: sqrt(1 + ln s / ln L) (LongRoPE / Phi-3,
  `longrope_attention_factor`), the default that transformers applies for `longrope`.
- `short_factor` (the paper's sec. 3.3 readjustment for short contexts) is not searched; it is
  all ones (plain RoPE up to the original length) unless given.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slm.errors import SlmError
from slm.utils.io import atomic_write_text

SEARCH_STEP = 0.01  # Table 1: lambda_i on a 0.01 grid
SEARCH_MAX_RATIO = 1.25  # Table 1: lambda_i in [1.0, 1.25 * s]


# --------------------------------------------------------------------------- formulas


def longrope_attention_factor(scale: float, original_max_position_embeddings: int) -> float:
    """sqrt(1 + ln(s) / ln(L_orig)); 1 for s <= 1.

    The attention (cos/sin) scale that LongRoPE's Phi-3 release uses and that transformers applies
    for `rope_type: longrope` when `attention_factor` is not given.
    """
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_position_embeddings))


def pi_factors(scale: float, n_pairs: int) -> np.ndarray:
    """Position interpolation (Chen et al. 2023): every pair slowed by s, lambda_i = s."""
    return np.full(n_pairs, float(scale))


def ntk_factors(scale: float, n_pairs: int) -> np.ndarray:
    """NTK-aware scaling: base' = base * s^(d/(d-2)), i.e. lambda_i = s^(2i/(d-2)) (= 1 at i=0, s at the last pair)."""
    if n_pairs == 1:
        return np.full(1, float(scale))
    d = 2 * n_pairs
    i = np.arange(n_pairs, dtype=np.float64)
    return float(scale) ** (2 * i / (d - 2))


def yarn_factors(
    scale: float,
    n_pairs: int,
    rope_theta: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:
    """YaRN's NTK-by-parts interpolation (Peng et al. 2023, Eq. 18-19) as per-pair factors.

    Pairs that rotate more than beta_fast times over L are kept (lambda = 1), pairs that rotate
    less than beta_slow times are interpolated (lambda = s), a linear ramp gamma between:
    theta'_i = (1 - gamma_i) theta_i / s + gamma_i theta_i, so lambda_i = 1 / ((1 - gamma_i)/s + gamma_i).
    Same correction range as transformers' `_compute_yarn_parameters` (truncate=True). "YaRN-like":
    YaRN's own attention temperature is replaced by the LongRoPE attention factor.
    """
    d = 2 * n_pairs

    def correction_dim(num_rotations: float) -> float:
        # YaRN Eq. 17 inverted: the pair index that completes `num_rotations` turns over L tokens
        turns = original_max_position_embeddings / (num_rotations * 2 * math.pi)
        return d * math.log(turns) / (2 * math.log(rope_theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(n_pairs, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # 1 = interpolate
    return 1.0 / (ramp / float(scale) + (1.0 - ramp))


def is_monotone(factors: Sequence[float]) -> bool:
    """LongRoPE sec. 3.2 constraint lambda_i <= lambda_{i+1}."""
    return bool(np.all(np.diff(np.asarray(factors, dtype=np.float64)) >= 0))


# --------------------------------------------------------------------------- evaluation


def _rotary_modules(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) for every transformers rotary-embedding module in `model`."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if hasattr(child, "inv_freq") and hasattr(child, "attention_scaling") and hasattr(child, "rope_type"):
                found.append((parent, name, child))
    if not found:
        raise SlmError(
            f"{type(model).__name__}: no transformers rotary-embedding module found; "
            "the LongRoPE search supports Llama-family (transformers RoPE) backbones such as `llama`"
        )
    return found


def longrope_parameters(
    model_config,
    long_factor: Sequence[float],
    original_max_position_embeddings: int,
    target_len: int,
    *,
    short_factor: Sequence[float] | None = None,
    attention_factor: float | None = None,
) -> dict[str, Any]:
    """transformers `rope_parameters` for the `longrope` type (what `ModelConfig.rope_scaling` takes)."""
    n_pairs = _n_pairs(model_config)
    scale = target_len / original_max_position_embeddings
    if attention_factor is None:
        attention_factor = longrope_attention_factor(scale, original_max_position_embeddings)
    return {
        "rope_type": "longrope",
        "long_factor": [float(x) for x in long_factor],
        "short_factor": [float(x) for x in (short_factor if short_factor is not None else [1.0] * n_pairs)],
        "original_max_position_embeddings": int(original_max_position_embeddings),
        "factor": float(scale),
        "attention_factor": float(attention_factor),
    }


def _n_pairs(model_config) -> int:
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return head_dim // 2


def _rope_theta(model_config) -> float:
    params = getattr(model_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(model_config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


@contextmanager
def patched_rope(model, rope_parameters: dict[str, Any], max_position_embeddings: int | None = None) -> Iterator[None]:
    """Run `model` with its rotary module(s) rebuilt from `rope_parameters`, restored afterwards.

    The new module is built by transformers itself (`type(rotary)(config_copy)`), so a candidate is
    evaluated by exactly the code that a config with these rope parameters runs.
    """
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {"rope_theta": _rope_theta(model.config), **copy.deepcopy(rope_parameters)}
    if max_position_embeddings is not None:
        cfg.max_position_embeddings = max(int(cfg.max_position_embeddings), int(max_position_embeddings))
    swaps = []
    for parent, name, old in _rotary_modules(model):
        new = type(old)(cfg).to(old.inv_freq.device)
        swaps.append((parent, name, old))
        setattr(parent, name, new)
    try:
        yield
    finally:
        for parent, name, old in swaps:
            setattr(parent, name, old)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, batch_size: int = 1) -> float:
    """exp(mean next-token NLL) over every predicted token of `input_ids` [N, T]."""
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll_sum += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(nll_sum / count)


def longrope_perplexity(
    model,
    input_ids: torch.Tensor,
    long_factor: Sequence[float],
    original_max_position_embeddings: int,
    *,
    short_factor: Sequence[float] | None = None,
    attention_factor: float | None = None,
    batch_size: int = 1,
) -> float:
    """Perplexity of `model` on `input_ids` [N, T] with LongRoPE factors `long_factor` (T = target length)."""
    target_len = int(input_ids.shape[1])
    params = longrope_parameters(
        model.config,
        long_factor,
        original_max_position_embeddings,
        target_len,
        short_factor=short_factor,
        attention_factor=attention_factor,
    )
    was_training = model.training
    model.eval()
    try:
        with patched_rope(model, params, max_position_embeddings=target_len):
            return perplexity(model, input_ids, batch_size=batch_size)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- search operators


def _mutate(parent: np.ndarray, rng: np.random.Generator, p: float, lo: float, hi: float, step: float) -> np.ndarray:
    """Mutation with the monotone constraint: with probability p, lambda_i is redrawn on the grid
    within [lambda_{i-1}, lambda_{i+1}] (the search-space bounds at the ends), as in the official
    dim_mono implementation; the child is monotone whenever the parent is."""
    child = parent.copy()
    n = child.shape[0]
    for i in range(n):
        if rng.random() < p:
            left = child[i - 1] if i > 0 else lo
            right = child[i + 1] if i < n - 1 else hi
            if right <= left:
                continue
            k = int(math.floor((right - left) / step + 1e-9))
            child[i] = min(left + step * int(rng.integers(0, k + 1)), right)
    return child


def _crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Crossover with the monotone constraint: each lambda_i from parent a or b with probability 1/2;
    None when the child breaks lambda_i <= lambda_{i+1} (the caller retries)."""
    child = np.where(rng.random(a.shape[0]) < 0.5, b, a)
    return child if is_monotone(child) else None


def _key(factors: np.ndarray) -> tuple[float, ...]:
    return tuple(np.round(factors, 9).tolist())


# --------------------------------------------------------------------------- search


def search_longrope_factors(
    model,
    input_ids: torch.LongTensor,
    original_max_position_embeddings: int,
    target_len: int,
    population: int = 16,
    generations: int = 8,
    mutation_prob: float = 0.3,
    seed: int = 0,
    progress: bool = True,
    *,
    parents: int | None = None,
    step: float = SEARCH_STEP,
    max_factor: float | None = None,
    attention_factor: float | None = None,
    short_factor: Sequence[float] | None = None,
    batch_size: int = 1,
    max_tries: int = 64,
) -> dict[str, Any]:
    """Evolutionary search for LongRoPE `long_factor` (Ding et al. 2024, Algorithm 1).

    model: a Llama-family causal LM trained at `original_max_position_embeddings`, with plain RoPE
        (the factors rescale theta_i = rope_theta^(-2i/d) of its config).
    input_ids: [N, target_len] held-out token ids; fitness = their perplexity at `target_len`.
    population: P, individuals per generation; `parents` (k, default P/2) survive as top-k, the rest
        are N1 = (P-k)//2 mutations and N2 = P-k-N1 crossovers.
    generations: T, evolution iterations after the initial population.
    mutation_prob: p, the per-factor mutation probability.
    max_factor: upper end of the search space (default 1.25 * s, Table 1).

    Deterministic for a given seed (numpy Generator; CPU forward passes are deterministic).
    Returns long_factor, short_factor, original_max_position_embeddings, target_len, scale,
    attention_factor, perplexity (of the best), history (best perplexity of the initial
    population, then after each generation: length generations+1, non-increasing), baselines
    (perplexity of the PI, NTK and YaRN seeds), evaluations (distinct candidates evaluated), seed.
    `longrope_rope_scaling(result)` turns it into a `ModelConfig.rope_scaling` mapping.
    """
    from tqdm.auto import tqdm

    if input_ids.dim() != 2:
        raise SlmError(f"input_ids: expected shape [N, target_len], got {tuple(input_ids.shape)}")
    if input_ids.shape[1] != target_len:
        raise SlmError(f"input_ids has sequences of {input_ids.shape[1]} tokens; target_len={target_len}")
    if original_max_position_embeddings < 2:
        raise SlmError(f"original_max_position_embeddings={original_max_position_embeddings}: expected >= 2")
    if target_len <= original_max_position_embeddings:
        raise SlmError(
            f"target_len={target_len} must exceed original_max_position_embeddings={original_max_position_embeddings}"
            " (LongRoPE's long factors apply only beyond the original length)"
        )
    if population < 4:
        raise SlmError(f"population={population}: expected >= 4 (PI, NTK, YaRN seeds and at least one mutation)")
    if generations < 0:
        raise SlmError(f"generations={generations}: expected >= 0")
    if not 0.0 < mutation_prob <= 1.0:
        raise SlmError(f"mutation_prob={mutation_prob}: expected 0 < p <= 1")
    k = parents if parents is not None else max(2, population // 2)
    if not 2 <= k < population:
        raise SlmError(f"parents={k}: expected 2 <= parents < population={population}")
    n_mutation = (population - k) // 2
    n_crossover = population - k - n_mutation

    n_pairs = _n_pairs(model.config)
    scale = target_len / original_max_position_embeddings
    lo, hi = 1.0, float(max_factor) if max_factor is not None else SEARCH_MAX_RATIO * scale
    if hi < scale:
        raise SlmError(f"max_factor={hi}: expected >= s={scale} so that PI lies in the search space")
    if attention_factor is None:
        attention_factor = longrope_attention_factor(scale, original_max_position_embeddings)
    short = [float(x) for x in short_factor] if short_factor is not None else [1.0] * n_pairs
    if len(short) != n_pairs:
        raise SlmError(f"short_factor has {len(short)} entries; the model needs head_dim/2={n_pairs}")

    rng = np.random.default_rng(seed)
    evaluated: dict[tuple[float, ...], float] = {}
    total = population + generations * (n_mutation + n_crossover)
    bar = tqdm(total=total, desc="LongRoPE search", unit="cand", disable=not progress, leave=False)

    def fitness(factors: np.ndarray) -> float:
        key = _key(factors)
        if key not in evaluated:
            evaluated[key] = longrope_perplexity(
                model,
                input_ids,
                factors.tolist(),
                original_max_position_embeddings,
                short_factor=short,
                attention_factor=attention_factor,
                batch_size=batch_size,
            )
        bar.update(1)
        return evaluated[key]

    def fresh_mutation(parent: np.ndarray) -> np.ndarray:
        child = parent
        for _ in range(max_tries):  # a mutation that changes nothing or repeats a candidate is redrawn
            child = _mutate(parent, rng, mutation_prob, lo, hi, step)
            if _key(child) not in evaluated and _key(child) not in pending:
                break
        return child

    def fresh_crossover(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        for _ in range(max_tries):
            child = _crossover(a, b, rng)
            if child is not None and _key(child) not in evaluated and _key(child) not in pending:
                return child
        return fresh_mutation(a)  # as the official implementation: mutate parent 1 instead

    try:
        # -- P_0: the PI, NTK and YaRN factors, then mutations of them (sec. 3.2)
        seeds = {
            "pi": pi_factors(scale, n_pairs),
            "ntk": ntk_factors(scale, n_pairs),
            "yarn": yarn_factors(scale, n_pairs, _rope_theta(model.config), original_max_position_embeddings),
        }
        pending: set[tuple[float, ...]] = set()
        members: list[np.ndarray] = []
        for f in seeds.values():
            if _key(f) not in pending:
                pending.add(_key(f))
                members.append(f)
        seed_list = list(seeds.values())
        attempts = 0  # bounded: a tiny search space (small head_dim or s) may not hold P distinct members
        while len(members) < population and attempts < max_tries * population:
            child = fresh_mutation(seed_list[attempts % len(seed_list)])
            attempts += 1
            if _key(child) not in pending:
                pending.add(_key(child))
                members.append(child)
        pop = [(f, fitness(f)) for f in members]
        pending = set()
        baselines = {name: evaluated[_key(f)] for name, f in seeds.items()}

        def top_k(individuals):
            return sorted(individuals, key=lambda x: x[1])[:k]  # stable: ties keep earlier members

        best = top_k(pop)
        history = [best[0][1]]
        bar.set_postfix(ppl=f"{history[-1]:.4g}")

        # -- Algorithm 1, lines 3-9
        for _ in range(generations):
            children: list[np.ndarray] = []
            for _m in range(n_mutation):
                parent = best[int(rng.integers(len(best)))][0]
                child = fresh_mutation(parent)
                pending.add(_key(child))
                children.append(child)
            for _c in range(n_crossover):
                i1, i2 = sorted(rng.choice(len(best), 2, replace=False).tolist())
                child = fresh_crossover(best[i1][0], best[i2][0])
                pending.add(_key(child))
                children.append(child)
            pending = set()
            scored = [(c, fitness(c)) for c in children]
            # P_t = P_mutation U P_crossover U top-k; the next top-k is the best k of them (deduplicated)
            seen, merged = set(), []
            for f, ppl in best + scored:
                if _key(f) not in seen:
                    seen.add(_key(f))
                    merged.append((f, ppl))
            best = top_k(merged)
            history.append(best[0][1])
            bar.set_postfix(ppl=f"{history[-1]:.4g}")
    finally:
        bar.close()

    factors, ppl = best[0]
    return {
        "long_factor": [float(x) for x in factors],
        "short_factor": short,
        "original_max_position_embeddings": int(original_max_position_embeddings),
        "target_len": int(target_len),
        "scale": float(scale),
        "attention_factor": float(attention_factor),
        "perplexity": float(ppl),
        "history": [float(h) for h in history],
        "baselines": {name: float(v) for name, v in baselines.items()},
        "evaluations": len(evaluated),
        "seed": int(seed),
    }


# --------------------------------------------------------------------------- output


def longrope_rope_scaling(result: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig.rope_scaling` mapping for a search result (set model.max_position_embeddings
    to at least result['target_len'])."""
    return {
        "rope_type": "longrope",
        "long_factor": [float(x) for x in result["long_factor"]],
        "short_factor": [float(x) for x in result["short_factor"]],
        "original_max_position_embeddings": int(result["original_max_position_embeddings"]),
        "factor": float(result.get("scale", result["target_len"] / result["original_max_position_embeddings"])),
        "attention_factor": float(result["attention_factor"]),
    }


def save_rope_scaling(result: dict[str, Any], path: str | Path) -> Path:
    """Write the `ModelConfig.rope_scaling` mapping of a search result to `path`.

    `.json`: the mapping as JSON. `.yaml` / `.yml`: the same mapping as YAML, under a comment that
    records the search's perplexity; both load straight into `model.rope_scaling`.
    """
    import yaml

    path = Path(path)
    scaling = longrope_rope_scaling(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        text = json.dumps(scaling, indent=2) + "\n"
    elif path.suffix in (".yaml", ".yml"):
        header = (
            "# LongRoPE factors (slm.analysis.longrope.search_longrope_factors): use as model.rope_scaling,\n"
            f"# with model.max_position_embeddings >= {int(result['target_len'])}.\n"
        )
        if "perplexity" in result:
            header += f"# perplexity at {int(result['target_len'])} tokens: {float(result['perplexity']):.6g}"
            if "pi" in result.get("baselines", {}):
                header += f" (PI: {float(result['baselines']['pi']):.6g})"
            header += "\n"
        text = header + yaml.safe_dump(scaling, sort_keys=False, default_flow_style=None)
    else:
        raise SlmError(f"{path}: expected a .json, .yaml or .yml file name")
    atomic_write_text(path, text)
    return path


def load_rope_scaling(path: str | Path) -> dict[str, Any]:
    """Read a mapping written by `save_rope_scaling` (JSON or YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SlmError(f"{path}: rope scaling file not found")
    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or data.get("rope_type") != "longrope":
        raise SlmError(f"{path}: expected a longrope rope_scaling mapping")
    return data
