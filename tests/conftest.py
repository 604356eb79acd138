"""Shared fixtures: a tiny demo corpus and tokenizer, tiny model sizes, one torch thread."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# stages set torch's threads from OMP_NUM_THREADS when no `threads` is configured (slm.threads): one, as below
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # tiny tensors on a shared 2-core machine: one thread is faster and deterministic
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small demo corpus + BPE tokenizer (session-wide; read-only for tests)."""
    from slm.config import DemoDataConfig
    from slm.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo")
    return generate_demo(
        DemoDataConfig(
            out_dir=str(root),
            hq_documents=200,
            train_documents=200,
            validation_documents=20,
            questions=10,
            vocab_size=400,
            retrieval_chars=400,
        )
    )


TINY_MODEL = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=512)
TINY_TRAIN = dict(
    seq_len=64,
    micro_batch_size=4,
    max_steps=6,
    eval_every=3,
    eval_batches=2,
    checkpoint_every=3,
    log_every=1,
    optim=dict(lr=3e-3, warmup_steps=2),
)


@pytest.fixture
def tiny_reference_cfg(tiny_demo, tmp_path):
    from slm.config import ReferenceConfig

    def make(out="ref", **train):
        return ReferenceConfig.model_validate(
            dict(
                out_dir=str(tmp_path / out),
                tokenizer=str(tiny_demo.tokenizer),
                corpus={"path": str(tiny_demo.hq)},
                validation={"path": str(tiny_demo.validation)},
                model=TINY_MODEL,
                train={**TINY_TRAIN, **train},
            )
        )

    return make


@pytest.fixture(scope="session")
def scored(tiny_demo, tmp_path_factory):
    """A trained tiny reference and the training corpus scored into shards (session-wide, read-only)."""
    from slm.config import ReferenceConfig, ScoreConfig
    from slm.stages import reference, score

    root = tmp_path_factory.mktemp("scored")
    ref = reference.run(
        ReferenceConfig.model_validate(
            dict(
                out_dir=str(root / "ref"),
                tokenizer=str(tiny_demo.tokenizer),
                corpus={"path": str(tiny_demo.hq)},
                model=TINY_MODEL,
                train={**TINY_TRAIN, "max_steps": 30, "checkpoint_every": 30, "eval_every": 30},
            )
        )
    )
    cfg = ScoreConfig.model_validate(
        dict(
            out_dir=str(root / "shards"),
            reference=ref["outputs"]["model"],
            seq_len=64,
            batch_size=8,
            documents_per_shard=50,
            corpus={"path": str(tiny_demo.train), "noise_field": "noise_spans"},
        )
    )
    score.run(cfg)
    return {"reference": ref["outputs"]["model"], "shards": cfg.out_dir, "score_cfg": cfg, "root": root}
