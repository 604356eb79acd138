"""Multi-process DeepSpeed on CPU (gloo): two ranks must do what one rank does.

Every distributed run goes through the real stage functions (slm.stages.reference / score /
pretrain .run with typed configs) inside tests/dist_worker.py, launched with
`torchrun --nproc_per_node 2` (or plain `python` for one rank) in a subprocess, so the pytest
process never joins a process group. The demo corpus and the 1-rank and 2-rank runs are built
once per module and shared by the tests that compare them.

Runs: one rank (no launcher) trains a reference model, scores the corpus, and pretrains with
micro_batch 4 x grad_accum 2 (ZeRO 0); two ranks score the corpus and pretrain with micro_batch
4 x grad_accum 1 under ZeRO stage 2; two more 2-rank runs are killed on one rank and resumed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slm.config import DemoDataConfig, SelectionConfig
from slm.data.demo import generate_demo
from slm.selection import selective_loss, top_k_mask, valid_tokens
from slm.training.distributed import free_port
from slm.training.loader import DeterministicLoader

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import KILL_EXIT_CODE, SELECTION_CASES, selection_ce, selection_inputs, selection_params  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")
MODEL = {
    "backbone": "llama",
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
SEQ_LEN = 64
MAX_STEPS = 6

pytestmark = pytest.mark.timeout(900)


# --------------------------------------------------------------------------- launching


def launch(tmp: Path, name: str, tasks: list[dict], nproc: int, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run dist_worker.py on `nproc` ranks (torchrun for 2, no launcher for 1); log to tmp/<name>.log."""
    spec = tmp / f"{name}.spec.json"
    spec.write_text(json.dumps({"results": str(tmp / "results"), "tasks": tasks}, indent=1))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(spec)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            str(WORKER),
            str(spec),
        ]
    log = tmp / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    if expect_ok and proc.returncode != 0:
        pytest.fail(
            f"{name}: {' '.join(cmd[1:3])} exited with {proc.returncode}; log {log}:\n" + log.read_text()[-6000:]
        )
    return proc


def result(tmp: Path, name: str, rank: int = 0) -> dict:
    return json.loads((tmp / "results" / f"{name}.rank{rank}.json").read_text())


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "model" / "model.safetensors"))


# --------------------------------------------------------------------------- configs


def pretrain_task(root: Path, name: str, shards: str, micro: int, accum: int, zero: int, **extra) -> dict:
    return {
        "name": name,
        "kind": "pretrain",
        "config": {
            "out_dir": str(root / name),
            "shards": str(root / shards),
            "model": MODEL,
            "train": {
                "seq_len": SEQ_LEN,
                "micro_batch_size": micro,
                "grad_accum": accum,
                "max_steps": MAX_STEPS,
                "zero_stage": zero,
                "eval_every": 1000,
                "checkpoint_every": 2,
                "keep_checkpoints": 2,
                "log_every": 1,
                "optim": {"lr": 3e-3, "warmup_steps": 2},
            },
            "selection": {"mode": "batch", "ratio": 0.6},
        },
        **extra,
    }


def score_task(root: Path, name: str) -> dict:
    return {
        "name": name,
        "kind": "score",
        "config": {
            "out_dir": str(root / name),
            "reference": str(root / "reference" / "model"),
            "corpus": {"path": str(root / "data" / "train.jsonl"), "noise_field": "noise_spans"},
            "seq_len": SEQ_LEN,
            "batch_size": 16,
            "documents_per_shard": 40,  # 150 documents -> 4 shards: rank 0 scores 0 and 2, rank 1 scores 1 and 3
        },
    }


# --------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    generate_demo(
        DemoDataConfig(
            out_dir=str(root / "data"),
            hq_documents=150,
            train_documents=150,
            validation_documents=20,
            questions=10,
            vocab_size=400,
        ),
        progress=False,
    )
    return root


@pytest.fixture(scope="module")
def one_rank(root: Path) -> Path:
    """One process: reference model, 1-rank scoring, 1-rank pretraining (4 x accum 2, and 8 x accum 1)."""
    reference = {
        "name": "reference",
        "kind": "reference",
        "config": {
            "out_dir": str(root / "reference"),
            "tokenizer": str(root / "data" / "tokenizer"),
            "corpus": {"path": str(root / "data" / "hq.jsonl")},
            "model": MODEL,
            "train": {
                "seq_len": SEQ_LEN,
                "micro_batch_size": 8,
                "max_steps": 4,
                "eval_every": 1000,
                "checkpoint_every": 1000,
                "optim": {"warmup_steps": 1},
            },
        },
    }
    tasks = [
        reference,
        score_task(root, "score_1rank"),
        pretrain_task(root, "pretrain_1rank", "score_1rank", micro=4, accum=2, zero=0),
        pretrain_task(root, "pretrain_1rank_mb8", "score_1rank", micro=8, accum=1, zero=0),
    ]
    launch(root, "one_rank", tasks, nproc=1)
    return root


@pytest.fixture(scope="module")
def two_ranks(one_rank: Path) -> Path:
    """Two ranks (torchrun, gloo): scoring, and uninterrupted ZeRO-2 pretraining (4 x accum 1 per rank)."""
    root = one_rank
    tasks = [
        score_task(root, "score_2rank"),
        pretrain_task(root, "pretrain_2rank", "score_1rank", micro=4, accum=1, zero=2),
    ]
    launch(root, "two_ranks", tasks, nproc=2)
    for name in ("score_2rank", "pretrain_2rank"):
        assert [result(root, name, r)["world"] for r in (0, 1)] == [2, 2]
    return root


# --------------------------------------------------------------------------- 1. training: 2 ranks == 1 rank


class _Rows:
    """A stand-in row source whose rows are their own stream indices."""

    seq_len = 1

    def __len__(self):
        return 50

    def rows(self, indices, columns):
        return {"i": np.asarray(indices)[:, None]}


def _micro_batches(micro: int, accum: int, rank: int, world: int, step: int) -> list[list[int]]:
    loader = DeterministicLoader(_Rows(), micro, accum, rank, world, seed=3, columns=("i",))
    return [mb["i"][:, 0].tolist() for mb in loader.micro_batches(step)]


def test_loader_slot_layout_gives_same_global_batch():
    """Which 1-rank configuration sees exactly what 2 ranks see.

    Slot layout: rank r takes micro-batch m at stream positions (m*world + r)*mb. With 1 rank and
    grad_accum 2, micro-batch m=0 is positions [0, 4) and m=1 is [4, 8); with 2 ranks and
    grad_accum 1, rank 0 has [0, 4) and rank 1 has [4, 8). So (1 rank, 4 x accum 2) and (2 ranks,
    4 x accum 1) split every global batch into the *same two micro-batches*: same rows, same
    grouping, hence the same per-micro-batch selection pools (mode batch) and the same
    per-micro-batch loss means, which the gradient average combines identically. (1 rank, 8 x
    accum 1) has the same 8 rows but one micro-batch: a pool of 8 rows for the top-k and a
    token-weighted mean over them, so its trajectory differs (checked below).
    The epoch wrap (50 rows, 8 per step) is crossed on purpose.
    """
    for step in range(9):
        one = _micro_batches(4, 2, 0, 1, step)
        two = [_micro_batches(4, 1, r, 2, step)[0] for r in (0, 1)]
        assert one == two, f"step {step}: 1 rank x accum 2 gives {one}, 2 ranks give {two}"
        big = _micro_batches(8, 1, 0, 1, step)
        assert big == [one[0] + one[1]]
        # a 2-rank run with accum 2 interleaves: rank 0 gets slots 0 and 2, rank 1 slots 1 and 3
        two_acc = [_micro_batches(2, 2, r, 2, step) for r in (0, 1)]
        assert [two_acc[0][0], two_acc[1][0], two_acc[0][1], two_acc[1][1]] == [
            one[0][:2],
            one[0][2:],
            one[1][:2],
            one[1][2:],
        ]


def test_two_rank_zero2_training_matches_one_rank(two_ranks: Path):
    """Same global batch, same loss trajectory and final weights: 2 ranks ZeRO-2 vs 1 rank ZeRO-0.

    Tolerance: with two ranks each gradient element is g0/2 + g1/2 (DeepSpeed's loss scaling by
    1/grad_accum on one rank, the gradient average over ranks on two): a sum of two fp32 terms is
    order independent and halving is exact, so the runs agree bit for bit here. The tolerances
    (1e-6 relative on losses, 1e-5 relative + 1e-6 absolute on weights after 6 AdamW steps) only
    leave room for a DeepSpeed that reduces in buckets or pre-divides in another order (a few
    fp32 ulps per step, which Adam's normalised update passes on at about lr * 1e-6 per step);
    any real mismatch of data, selection pool or averaging moves the loss by >1e-3.
    """
    root = two_ranks
    one, two = metrics(root / "pretrain_1rank"), metrics(root / "pretrain_2rank")
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, MAX_STEPS + 1))
    # the logged loss is the mean over ranks (rank 0's micro-batch alone would differ from the 1-rank mean)
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-6, atol=0)
    np.testing.assert_allclose([m["lr"] for m in two], [m["lr"] for m in one], rtol=1e-12)
    assert [m["tokens"] for m in two] == [m["tokens"] for m in one]
    assert one[-1]["loss"] < one[0]["loss"] - 0.01, "the model did not train: a weak comparison"

    w1, w2 = weights(root / "pretrain_1rank"), weights(root / "pretrain_2rank")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # ZeRO-2 really partitioned the optimizer state over the two ranks
    ckpt = root / "pretrain_2rank" / "checkpoints" / f"step-{MAX_STEPS:08d}"
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
    ]

    # the same rows as one micro-batch of 8 is a different computation (selection pool of 8 rows)
    mb8 = metrics(root / "pretrain_1rank_mb8")
    assert [m["tokens"] for m in mb8] == [m["tokens"] for m in one]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(mb8, one)) > 1e-4


# --------------------------------------------------------------------------- 2. scoring: 2 ranks == 1 rank


def test_two_rank_scoring_matches_one_rank(two_ranks: Path):
    """Each shard is scored whole by one rank, so the shards are the same bytes.

    ref_loss is compared to 1e-6 (absolute) although it comes out identical: the rows of a
    shard are scored in the same batches by the same weights whichever rank does it.
    """
    from slm.shards import ShardSet

    root = two_ranks
    m1 = json.loads((root / "score_1rank" / "manifest.json").read_text())
    m2 = json.loads((root / "score_2rank" / "manifest.json").read_text())
    assert m2["complete"] and m1["complete"]
    assert sorted(m1["shards"]) == sorted(m2["shards"]) == [f"shard-{k:05d}.arrow" for k in range(4)]
    for name, e1 in m1["shards"].items():
        e2 = m2["shards"][name]
        assert {k: e2[k] for k in ("rows", "tokens", "documents", "nan_tokens", "bytes", "sha256")} == {
            k: e1[k] for k in ("rows", "tokens", "documents", "nan_tokens", "bytes", "sha256")
        }, name
    assert m1["metadata"] == m2["metadata"]
    assert m1["totals"] == m2["totals"]

    s1, s2 = ShardSet(root / "score_1rank"), ShardSet(root / "score_2rank")
    assert len(s1) == len(s2) > 0
    cols = ("sequence_id", "input_ids", "ref_loss", "loss_mask", "noise")
    r1, r2 = s1.rows(np.arange(len(s1)), cols), s2.rows(np.arange(len(s2)), cols)
    for c in ("sequence_id", "input_ids", "loss_mask", "noise"):
        np.testing.assert_array_equal(r2[c], r1[c], err_msg=c)
    np.testing.assert_allclose(r2["ref_loss"], r1["ref_loss"], rtol=0, atol=1e-6, equal_nan=True)
    assert (
        np.isnan(r1["ref_loss"][:, 0]).all() and np.isfinite(r1["ref_loss"][:, 1:][r1["loss_mask"][:, 1:] == 1]).all()
    )
    # both ranks finished the same stage
    assert [result(root, "score_2rank", r)["result"]["status"] for r in (0, 1)] == ["complete", "complete"]


# --------------------------------------------------------------------------- 3. kill one rank, resume on both


KILLS = {"step": 3, "checkpoint": 4}  # where rank 1 dies -> the step it dies at


@pytest.fixture(scope="module")
def killed_and_resumed(two_ranks: Path) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    """For each kill point: a 2-rank run whose rank 1 dies there; then one 2-rank launch resumes them all.

    Returns {where: (the killed launch, checkpoint directories left behind, marker or not)}.
    """
    root = two_ranks
    killed, tasks = {}, []
    for where, step in KILLS.items():
        task = pretrain_task(root, f"killed_at_{where}", "score_1rank", micro=4, accum=1, zero=2)
        proc = launch(
            root,
            f"killed_at_{where}",
            [{**task, "kill": {"rank": 1, "step": step, "where": where}}],
            nproc=2,
            expect_ok=False,
        )
        ckpts = root / task["name"] / "checkpoints"
        left = sorted(
            f"{p.name}{'' if (p / 'slm-complete.json').is_file() else ' (no marker)'}" for p in ckpts.glob("step-*")
        )
        killed[where] = (proc, left)
        tasks.append(task)
    launch(root, "resume", tasks, nproc=2)  # the same configs, resume auto (the stage default)
    return killed


@pytest.mark.parametrize("where", list(KILLS))
def test_killed_rank_resumes_on_both(two_ranks: Path, killed_and_resumed, where: str):
    """A 2-rank run whose rank 1 dies resumes (resume auto) on both ranks to the uninterrupted result.

    step:        rank 1 exits (os._exit) just before step 3's forward; rank 0 blocks in the
                 gradient all-reduce and torchrun ends it: checkpoint 2 is whole, step 3 is lost.
    checkpoint:  rank 1 exits inside the save of checkpoint 4, after DeepSpeed wrote its files
                 but before the completion marker: checkpoint 4 must be ignored, resume from 2.
    Tolerance 1e-6 absolute on weights: the resumed run restores weights, AdamW moments, the
    scheduler and the data position, and replays the same micro-batches on the same ranks; it
    is in fact bit-identical to the uninterrupted 2-rank run.
    """
    root = two_ranks
    name = f"killed_at_{where}"
    proc, left = killed_and_resumed[where]
    log = (root / f"{name}.log").read_text()
    # torchrun reports the first failure as "failed (exitcode: 17) local_rank: 1", then ends rank 0
    assert proc.returncode != 0 and re.search(rf"exitcode:\s*{KILL_EXIT_CODE}\)\s*local_rank:\s*1\b", log), (
        f"rank 1 was not killed as planned:\n{log[-4000:]}"
    )
    expected_left = {"step": ["step-00000002"], "checkpoint": ["step-00000002", "step-00000004 (no marker)"]}[where]
    assert left == expected_left

    out = root / name
    for r in (0, 1):
        res = result(root, name, r)
        assert res["world"] == 2 and res["result"]["status"] == "complete"
        assert res["result"]["metrics"]["resumed_from"] == 2
        assert res["result"]["metrics"]["steps"] == MAX_STEPS

    whole = [ck for ck in sorted((out / "checkpoints").glob("step-*")) if (ck / "slm-complete.json").is_file()]
    assert whole and all(
        {p.name for p in ck.glob("rng-rank*.pt")} == {"rng-rank00000.pt", "rng-rank00001.pt"} for ck in whole
    )

    ref_w, got_w = weights(root / "pretrain_2rank"), weights(out)
    assert got_w.keys() == ref_w.keys()
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the metrics log was cut back to the checkpoint and continued: it reads like the uninterrupted one
    got, ref = metrics(out), metrics(root / "pretrain_2rank")
    assert [m["step"] for m in got] == list(range(1, MAX_STEPS + 1))
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in ref], rtol=1e-6, atol=0)


def test_a_stop_request_on_one_rank_stops_both_at_the_same_step(two_ranks: Path):
    """SIGUSR1 reaches rank 1 only, during step 3: both ranks finish step 3, write its whole checkpoint (every
    rank's RNG file) and exit 3, naming the step; the resumed run ends with the uninterrupted 2-rank weights."""
    root = two_ranks
    task = pretrain_task(root, "signalled", "score_1rank", micro=4, accum=1, zero=2)
    proc = launch(root, "signalled", [{**task, "kill": {"rank": 1, "step": 3, "where": "signal"}}], 2, expect_ok=False)
    assert proc.returncode != 0
    said = [result(root, "signalled", r)["interrupted"] for r in (0, 1)]
    assert "stopped by a stop request on another rank after step 3 of 6" in said[0]
    assert "stopped by SIGUSR1 after step 3 of 6" in said[1]
    ckpt = root / "signalled" / "checkpoints" / "step-00000003"
    assert (ckpt / "slm-complete.json").is_file()
    assert {p.name for p in ckpt.glob("rng-rank*.pt")} == {"rng-rank00000.pt", "rng-rank00001.pt"}
    launch(root, "signalled_resume", [task], nproc=2)
    assert result(root, "signalled", 0)["result"]["metrics"]["resumed_from"] == 3
    ref_w, got_w = weights(root / "pretrain_2rank"), weights(root / "signalled")
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- 4. global selection over gloo


def test_global_selection_equals_single_process_top_k(tmp_path: Path):
    """mode=global on two gloo ranks == one process ranking both ranks' tokens together.

    Kept masks must be equal exactly (ties included: both break them by position in the
    concatenation rank 0, rank 1). Loss and gradients: each rank's loss is its kept sum divided
    by (global kept count / world), so the mean over ranks (what DeepSpeed's gradient average
    and the logged loss take) must equal the batch-mode loss over the concatenated batch, and
    so must the rank-averaged parameter gradients; the per-token gradient on a rank, divided
    by world, must equal the single-process per-token gradient. fp32 throughout: sums of at
    most 80 terms in another association differ by a few ulps, hence rtol 1e-5 (atol 1e-7 for
    the zero gradients of dropped tokens).
    """
    ratio = 0.6
    launch(
        tmp_path,
        "selection",
        [{"name": "selection", "kind": "global_selection", "ratio": ratio, "cases": list(SELECTION_CASES)}],
        nproc=2,
    )
    ranks = [torch.load(tmp_path / "results" / f"selection.rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for case in SELECTION_CASES:
        per_rank = [selection_inputs(case, r) for r in (0, 1)]
        batch = {k: torch.cat([p[k] for p in per_rank]) for k in per_rank[0]}
        theta, b = selection_params()
        ce = selection_ce(batch["x"], theta, b)
        ce.retain_grad()
        valid = valid_tokens(ce, batch["ref_loss"], batch["loss_mask"])
        expected_mask = top_k_mask((ce.detach() - batch["ref_loss"]).reshape(-1), valid.reshape(-1), ratio).view_as(ce)
        sel = selective_loss(ce, batch["ref_loss"], SelectionConfig(mode="batch", ratio=ratio), batch["loss_mask"])
        sel.loss.backward()

        got_mask = torch.cat([r[case]["weights"] for r in ranks]).bool()
        assert torch.equal(got_mask, expected_mask), (
            f"{case}: kept masks differ at {(got_mask != expected_mask).nonzero().tolist()}"
        )
        assert torch.equal(sel.weights.bool(), expected_mask)
        assert int(got_mask.sum()) == round(ratio * int(valid.sum()))
        for r in ranks:
            torch.testing.assert_close(
                r[case]["loss_mean"],
                sel.loss.detach(),
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m, case=case: f"{case} loss: {m}",
            )
            torch.testing.assert_close(
                r[case]["param_grads"],
                torch.stack([theta.grad, b.grad]),
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m, case=case: f"{case} grads: {m}",
            )
        torch.testing.assert_close(
            torch.cat([r[case]["ce_grad"] for r in ranks]) / 2,
            ce.grad,
            rtol=1e-5,
            atol=1e-7,
            msg=lambda m, case=case: f"{case} token grads: {m}",
        )
        if case == "empty_rank":
            assert not ranks[1][case]["weights"].any() and float(ranks[1][case]["loss"]) == 0.0
            assert not ranks[1][case]["ce_grad"].any()
        if case == "ties":
            excess = (ce.detach() - batch["ref_loss"])[valid]
            cut = excess.sort(descending=True).values[int(expected_mask.sum()) - 1]
            assert int((excess == cut).sum()) > 1, "the ties case should have ties at the cut"
