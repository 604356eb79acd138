"""Each registered backbone's tiny-model recipe and the inputs of its shared property tests
(test_backbone_properties.py), one `Case` per backbone in CASES. Imported as `backbone_cases`
(pytest puts tests/models on sys.path); the per-backbone test files build their models here too.

The inputs differ by backbone because the mechanisms do: lengths cross a backbone's segment,
block, window or chunk boundaries; the float64 tolerances are 1e-10 for the softmax-only
backbones and 1e-8 where RoPE'd memories (beacon) or FFT convolutions (megalodon) add round-off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from helpers import make_tiny_model, norm_jitter, random_cuts, random_split, set_infini_beta, tokens

from slm.models import BACKBONES


def _nothing(model) -> None:
    pass


@dataclass(frozen=True)
class Stream:
    """Processing `length` tokens (2 rows, seed 1) in chunks with the carried state equals one pass:
    every chunking in `splits` and two drawn by `random(generator seeded gen_seed)`, within `tol`."""

    length: int
    splits: tuple[tuple[int, ...], ...]
    random: Callable[[torch.Generator], list[int]]
    gen_seed: int
    tol: float
    variants: tuple[dict, ...] = ({},)  # model overrides, one test each
    kwargs: dict = field(default_factory=dict)  # passed to every forward (use_cache=True)
    prepare: Callable = _nothing


@dataclass(frozen=True)
class Causality:
    """Changing token t (by `delta`, mod vocab) changes no output before t (|diff| < before_tol, or bit-equal
    when before_tol is 0) and changes the output from t on (> 1e-6)."""

    batch: int
    length: int
    seed: int
    positions: tuple[int, ...]
    delta: int
    before_tol: float
    prepare: Callable = _nothing


@dataclass(frozen=True)
class RoundTrip:
    """save_pretrained + from_pretrained (float32) keeps the class, `expect`ed config values, tied weights
    (if `tied`) and bit-equal logits on `length` tokens (2 rows, token seed `seed`)."""

    variants: tuple[tuple[dict, dict], ...]  # (model overrides, config values expected after loading)
    length: int
    seed: int | None
    tied: bool
    prepare: Callable = _nothing


@dataclass(frozen=True)
class Training:
    """AdamW steps on `ids` (4 rows) lower the loss: losses[-1] < ratio * losses[0] and/or
    < losses[0] - margin; `trained(model)` names a parameter that must get a gradient."""

    jittered: bool  # Case.make (jittered weights) or the backbone's own init under torch.manual_seed(0)
    length: int
    seed: int
    masked_prefix: int  # labels[:, :masked_prefix] = -100
    steps: int
    lr: float
    ratio: float | None = None
    margin: float | None = None
    overrides: dict = field(default_factory=dict)
    trained: Callable[[Any], torch.Tensor] | None = None


@dataclass(frozen=True)
class Bounded:
    """The carried state after 64 and after 512 tokens has the same size (and after 3 more tokens on each)."""

    overrides: dict
    dtype: torch.dtype
    seed: int | None
    kwargs: dict = field(default_factory=dict)
    tensors: Callable[[Any], list[torch.Tensor]] = lambda state: state.tensors()
    extra: Callable[[Any, Any], None] = lambda model, state_512: None  # backbone-specific size checks


@dataclass(frozen=True)
class Generate:
    """model.generate (greedy, `steps` new tokens after an 11-token prompt) equals recomputing every step."""

    dtype: torch.dtype
    seed: int | None
    steps: int
    kwargs: dict = field(default_factory=dict)
    prepare: Callable = _nothing


@dataclass(frozen=True)
class Case:
    name: str  # the registry name; config and model classes come from slm.models.BACKBONES
    vocab: int
    sizes: dict  # the tiny config's keys
    jitter: Callable[[str], float]  # make_tiny_model's parameter jitter
    position: Callable[[Any], int]  # the absolute position a carried state holds
    stream: Stream
    causality: Causality
    round_trip: RoundTrip
    training: Training
    bounded: Bounded | str  # a str: why the property does not apply
    generate: Generate
    rejects: tuple[tuple[str, Any], ...]  # config key=value pairs that must raise a ValueError naming the key
    state_in_training: bool = False  # the forward returns a state in train mode too

    def config(self, **overrides):
        return BACKBONES[self.name].config_cls(**{**self.sizes, **overrides})

    def make(self, dtype=torch.float64, seed=0, **overrides):
        """The tiny model, seeded, cast to dtype, in eval mode, with jittered weights."""
        return make_tiny_model(BACKBONES[self.name].model_cls, self.config(**overrides), dtype, seed, self.jitter)

    def init(self, **overrides):
        """The tiny model with the backbone's own weight init (under the caller's torch seed)."""
        return BACKBONES[self.name].model_cls(self.config(**overrides))


def _set_beta(value):
    return lambda model: set_infini_beta(model, value)


def _beacon_state_tensors(state):
    return [t for s in state.layers for t in (s.mem_k, s.mem_v, s.raw_k, s.raw_v)]


def _beacon_memory_is_three_windows(model, state):
    assert state.layers[0].mem_k.shape[2] == 3 * 4  # 3 windows of 16 / 4 beacons


def _megalodon_state_tensors(state):
    t = [state.final_mean, state.final_var]
    for s in state.layers:
        t += [s.norm_mean, s.norm_var, s.cema_h, s.k, s.v]
    return t


def _megalodon_keeps_only_the_open_chunk(model, state):
    s70 = model(tokens(model.config.vocab_size, 1, 70, seed=None), use_cache=True).cache
    assert s70.layers[0].k.shape[2] == 70 % 16  # only the incomplete chunk's keys are kept


_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case(
            name="llama",
            vocab=64,
            sizes=dict(vocab_size=64, **_TINY, num_key_value_heads=4, max_position_embeddings=256),
            jitter=norm_jitter,
            position=lambda state: state.get_seq_length(),
            stream=Stream(
                length=33,
                splits=((1,) * 33, (3, 4, 8, 2, 16), (7, 1, 9, 16)),
                random=lambda gen: random_split(33, gen, 11),
                gen_seed=0,
                tol=1e-10,
                kwargs=dict(use_cache=True),
            ),
            causality=Causality(2, 32, 1, positions=(0, 5, 19, 31), delta=7, before_tol=1e-12),
            round_trip=RoundTrip(variants=(({}, {}),), length=20, seed=1, tied=False),
            training=Training(jittered=True, length=32, seed=1, masked_prefix=0, steps=10, lr=1e-2, ratio=0.8),
            bounded="llama keeps every key and value (its KV cache grows with the sequence): not a streaming backbone",
            generate=Generate(torch.float32, seed=1, steps=9, kwargs=dict(pad_token_id=0)),
            rejects=(),  # slm checks llama's rope settings itself (tests/models/test_llama_rope.py)
            state_in_training=True,  # transformers' Llama returns its KV cache in train mode too
        ),
        Case(
            name="infini",
            vocab=64,
            sizes=dict(vocab_size=64, **_TINY, segment_len=8, memory_update="delta"),
            jitter=norm_jitter,
            position=lambda state: state.position,
            stream=Stream(
                length=45,
                splits=((1,) * 45, (3, 5, 8, 13, 16), (8,) * 5 + (5,), (7, 1, 9, 20, 8)),
                random=lambda gen: random_split(45, gen, 12),
                gen_seed=0,
                tol=1e-10,
                variants=(dict(memory_update="delta"), dict(memory_update="linear")),
                prepare=_set_beta(0.3),
            ),
            causality=Causality(
                2, 32, 1, positions=(0, 5, 8, 19, 31), delta=7, before_tol=1e-12, prepare=_set_beta(0.5)
            ),
            round_trip=RoundTrip(
                variants=(
                    (
                        dict(memory_update="linear", segment_len=6, gate_init=0.7),
                        dict(segment_len=6, memory_update="linear"),
                    ),
                ),
                length=20,
                seed=1,
                tied=False,
                prepare=_set_beta(0.25),
            ),
            training=Training(
                jittered=True,
                length=32,
                seed=1,
                masked_prefix=0,
                steps=10,
                lr=1e-2,
                ratio=0.8,
                trained=lambda model: model.model.layers[0].self_attn.beta,  # the gate is trained
            ),
            bounded=Bounded(overrides={}, dtype=torch.float32, seed=1),
            generate=Generate(torch.float32, seed=1, steps=9, prepare=_set_beta(0.0)),
            rejects=(("segment_len", 0), ("memory_update", "none"), ("memory_eps", 0.0), ("num_attention_heads", 5)),
        ),
        Case(
            name="fam",
            vocab=64,
            sizes=dict(vocab_size=64, **_TINY, block_len=5, memory_blocks=1, fam_len=3),
            jitter=norm_jitter,
            position=lambda state: state.position,
            stream=Stream(
                length=33,
                splits=((1,) * 33, (3, 4, 8, 2, 16), (5,) * 6 + (3,), (7, 1, 9, 16)),
                random=lambda gen: random_split(33, gen, 11),
                gen_seed=0,
                tol=1e-10,
                variants=(
                    dict(fam_init="prompt", memory_blocks=1),
                    dict(fam_init="prefix", memory_blocks=2),
                    dict(fam_init="prompt", memory_blocks=0),
                ),
            ),
            causality=Causality(2, 32, 1, positions=(0, 4, 5, 19, 31), delta=7, before_tol=1e-12),
            round_trip=RoundTrip(
                variants=tuple(
                    (
                        dict(fam_init=init, block_len=6, memory_blocks=2, fam_len=4),
                        dict(block_len=6, memory_blocks=2, fam_len=4),
                    )
                    for init in ("prompt", "prefix")
                ),
                length=20,
                seed=1,
                tied=False,
            ),
            training=Training(
                jittered=True,
                length=32,
                seed=1,
                masked_prefix=0,
                steps=10,
                lr=1e-2,
                ratio=0.8,
                overrides=dict(block_len=8),
                trained=lambda model: model.model.fam_prompt,
            ),
            bounded=Bounded(overrides=dict(block_len=8, memory_blocks=2), dtype=torch.float32, seed=1),
            generate=Generate(torch.float32, seed=1, steps=9),
            rejects=(
                ("block_len", 0),
                ("memory_blocks", -1),
                ("fam_len", -2),
                ("fam_init", "zeros"),
                ("num_attention_heads", 5),
            ),
        ),
        Case(
            name="beacon",
            vocab=53,
            sizes=dict(
                vocab_size=53,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                window_len=8,
                condensing_ratio=2,
                max_beacon_windows=64,
                rms_norm_eps=1e-6,
                rope_theta=500.0,
            ),
            # larger weights than the 0.02 init so attention is far from uniform
            jitter=lambda name: 0.02 if "norm" in name else 0.15,
            position=lambda state: state.pos,
            stream=Stream(
                length=35,
                splits=((1,) * 35, (8, 8, 8, 8, 3), (3, 5, 1, 7, 13, 6), (20, 1, 1, 13)),
                random=lambda gen: random_cuts(35, gen),
                gen_seed=2,
                tol=1e-8,
                variants=({}, dict(num_key_value_heads=2, condensing_ratio=4, max_beacon_windows=2)),
                kwargs=dict(use_cache=True),
            ),
            causality=Causality(1, 30, 3, positions=(13,), delta=1, before_tol=0.0),
            round_trip=RoundTrip(variants=(({}, {}),), length=19, seed=None, tied=True),
            training=Training(
                jittered=False,
                length=24,
                seed=4,
                masked_prefix=3,
                steps=8,
                lr=1e-2,
                margin=0.1,
                trained=lambda model: model.model.beacon_embed_tokens.weight,  # beacons learn through later windows
            ),
            bounded=Bounded(
                overrides=dict(window_len=16, condensing_ratio=4, max_beacon_windows=3),
                dtype=torch.float64,
                seed=None,
                kwargs=dict(use_cache=True),
                tensors=_beacon_state_tensors,
                extra=_beacon_memory_is_three_windows,
            ),
            generate=Generate(torch.float64, seed=None, steps=7, kwargs=dict(use_cache=True, pad_token_id=0)),
            rejects=(
                ("condensing_ratio", 3),
                ("condensing_ratio", -1),
                ("max_beacon_windows", 0),
                ("num_key_value_heads", 3),
            ),
        ),
        Case(
            name="megalodon",
            vocab=61,
            sizes=dict(
                vocab_size=61,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=48,
                z_dim=16,
                value_dim=32,
                cema_ndim=4,
                chunk_len=8,
                norm_num_groups=4,
            ),
            # every parameter moved by 0.1 randn: the zero-initialised gains/offsets leave their special values
            jitter=lambda name: 0.1,
            position=lambda state: state.pos,
            stream=Stream(
                length=37,
                splits=((1,) * 37, (8, 8, 8, 8, 5), (3, 5, 1, 7, 13, 8), (20, 1, 1, 15)),
                random=lambda gen: random_cuts(37, gen),
                gen_seed=2,
                tol=1e-8,
                kwargs=dict(use_cache=True),
            ),
            # FFT round-off only before t (the convolution mixes positions)
            causality=Causality(1, 30, 3, positions=(17,), delta=1, before_tol=1e-10),
            round_trip=RoundTrip(variants=(({}, {}),), length=19, seed=None, tied=True),
            training=Training(jittered=False, length=24, seed=4, masked_prefix=3, steps=8, lr=3e-3, margin=0.1),
            bounded=Bounded(
                overrides=dict(chunk_len=16),
                dtype=torch.float64,
                seed=None,
                kwargs=dict(use_cache=True),
                tensors=_megalodon_state_tensors,
                extra=_megalodon_keeps_only_the_open_chunk,
            ),
            generate=Generate(torch.float64, seed=None, steps=6, kwargs=dict(use_cache=True, pad_token_id=0)),
            rejects=(("chunk_len", 0), ("norm_num_groups", 5), ("z_dim", 6)),
        ),
    ]
}
