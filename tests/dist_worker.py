"""Worker for tests/test_distributed.py: runs slm stages (or a selection check) in one process group.

    torchrun --nproc_per_node 2 --master_port PORT tests/dist_worker.py SPEC.json
    python tests/dist_worker.py SPEC.json            # one process, no launcher

SPEC.json: {"results": DIR, "tasks": [TASK, ...]}; the tasks run in order in this process group.
A TASK is {"name": str, "kind": one of reference | score | pretrain | global_selection, ...}:
  reference / score / pretrain:  "config": the stage's config as a dict (validated by its typed
      config class); pretrain optionally "kill": {"rank": R, "step": S, "where": "step" | "checkpoint"}.
      A kill ends rank R's process with os._exit (no clean-up, as a crash would): "step" just
      before the first forward of optimizer step S (1-based; steps < S are done), "checkpoint"
      halfway through saving the checkpoint of step S (DeepSpeed files written, marker not).
      "where": "signal" sends rank R a SIGUSR1 instead, just before the first forward of step S
      (a stop request on one rank only: every rank must stop after step S, slm.preempt).
  global_selection: "ratio", "cases": fixed tensors per rank (selection_inputs) through
      slm.selection.selective_loss in mode global; writes kept masks, losses and gradients.
Each rank writes DIR/<name>.rank<r>.json ({rank, world, result: the stage's return value}) or
DIR/<name>.rank<r>.pt (selection tensors).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

KILL_EXIT_CODE = 17


def _rank() -> int:
    from slm.training.distributed import rank

    return rank()


def _install_kill(kill: dict | None, grad_accum: int) -> None:
    """Arrange for rank kill['rank'] to die at the given point of the next training run."""
    if not kill:
        return
    target, step, where = kill["rank"], kill["step"], kill.get("where", "step")
    if where in ("step", "signal"):
        import signal

        import slm.stages.pretrain as pretrain

        def die_at_step(step_loss):
            calls = {"n": 0}

            def wrapped(model, batch):
                # micro-batch call n belongs to optimizer step n // grad_accum + 1 (1-based)
                if _rank() == target and calls["n"] // grad_accum + 1 == step:
                    if where == "step":
                        os._exit(KILL_EXIT_CODE)
                    if calls["n"] % grad_accum == 0:
                        os.kill(os.getpid(), signal.SIGUSR1)
                calls["n"] += 1
                return step_loss(model, batch)

            return wrapped

        original_make = pretrain.make_step_loss
        pretrain.make_step_loss = lambda cfg: die_at_step(original_make(cfg))
    elif where == "checkpoint":
        import slm.training.checkpoint as ckpt

        original_save = ckpt.save_checkpoint

        def save_then_die(engine, ckpt_dir, step_, client_state, keep):
            if step_ == step and _rank() == target:
                engine.save_checkpoint(str(ckpt_dir), tag=ckpt.tag_for(step_), client_state=client_state)
                os._exit(KILL_EXIT_CODE)
            return original_save(engine, ckpt_dir, step_, client_state, keep)

        ckpt.save_checkpoint = save_then_die
    else:
        raise ValueError(f"unknown kill point {where!r}")


def run_stage(task: dict, results: Path) -> None:
    from slm.config import PretrainConfig, ReferenceConfig, ScoreConfig
    from slm.stages import pretrain, reference, score

    kind = task["kind"]
    cls, module = {
        "reference": (ReferenceConfig, reference),
        "score": (ScoreConfig, score),
        "pretrain": (PretrainConfig, pretrain),
    }[kind]
    cfg = cls.model_validate(task["config"])
    if kind == "pretrain":
        _install_kill(task.get("kill"), cfg.train.grad_accum)
    # The stages build their model from the global torch RNG without seeding it (train.seed is
    # applied only after the model exists), so seed here: a run's initial weights must not
    # depend on what ran before it in this process.
    torch.manual_seed(task.get("init_seed", 0))
    from slm.preempt import Interrupted
    from slm.training.distributed import world_size

    try:
        out = module.run(cfg)
    except Interrupted as e:  # stopped on request: record the message, exit as the CLI would (3)
        record = {"rank": _rank(), "world": world_size(), "interrupted": str(e)}
        (results / f"{task['name']}.rank{_rank()}.json").write_text(json.dumps(record))
        sys.exit(e.exit_code)
    record = {"rank": _rank(), "world": world_size(), "result": out}
    (results / f"{task['name']}.rank{_rank()}.json").write_text(json.dumps(record, default=str))


SELECTION_CASES = ("random", "ties", "empty_rank")


def selection_inputs(case: str, rank: int) -> dict[str, torch.Tensor]:
    """Fixed per-rank inputs, rebuilt identically by the test (ranks differ in batch size).

    random      distinct excess values: the top-k is unambiguous
    ties        excess on a coarse grid, many exact ties at the cut: global and single-process
                selection must break them the same way (stable order, rank 0's tokens first)
    empty_rank  rank 1 has no valid token (all padding): it must keep nothing, send zero
                gradients, and the other rank still keeps ratio of the *global* valid tokens
    """
    g = torch.Generator().manual_seed(1000 * SELECTION_CASES.index(case) + rank)
    B, T = (3, 16) if rank == 0 else (2, 16)
    if case == "ties":
        x = torch.randint(-2, 3, (B, T), generator=g).float()
        ref = torch.randint(0, 4, (B, T), generator=g).float() * 0.25
    else:
        x = torch.randn(B, T, generator=g)
        ref = torch.rand(B, T, generator=g) * 2
    ref[:, 0] = float("nan")  # position 0 has no context, as in the shards
    mask = torch.ones(B, T, dtype=torch.int8)
    mask[-1, T - 4 + rank :] = 0  # some padding at the end of the last row
    if case == "empty_rank" and rank == 1:
        mask.zero_()
    return {"x": x, "ref_loss": ref, "loss_mask": mask}


def selection_params() -> tuple[torch.Tensor, torch.Tensor]:
    """Two parameters shared by all ranks (like model weights under data parallelism)."""
    return torch.tensor(0.5, requires_grad=True), torch.tensor(0.25, requires_grad=True)


def selection_ce(x: torch.Tensor, theta: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token 'cross-entropy' [B, T] as a function of the shared parameters.

    Affine on purpose: a single IEEE multiply and add per element, so a token's value is the
    same bit for bit whether it is computed on its rank or in the concatenated batch (the
    vectorised and scalar paths of transcendental ops can differ in the last bit).
    """
    ce = x * theta + b
    return torch.cat([torch.full_like(ce[:, :1], float("nan")), ce[:, 1:]], dim=1)  # NaN at t=0, as token_losses


def run_global_selection(task: dict, results: Path) -> None:
    import torch.distributed as dist

    from slm.config import SelectionConfig
    from slm.selection import selective_loss
    from slm.training.distributed import init_distributed, rank, world_size

    init_distributed()
    r, world = rank(), world_size()
    out = {"world": world}
    for case in task["cases"]:
        inputs = selection_inputs(case, r)
        theta, b = selection_params()
        ce = selection_ce(inputs["x"], theta, b)
        ce.retain_grad()
        sel = selective_loss(
            ce, inputs["ref_loss"], SelectionConfig(mode="global", ratio=task["ratio"]), inputs["loss_mask"]
        )
        sel.loss.backward()
        # what DeepSpeed does with parameter gradients (and what the logged loss now is): mean over ranks
        param_grads = torch.stack([theta.grad, b.grad])
        dist.all_reduce(param_grads)
        loss_mean = sel.loss.detach().clone()
        dist.all_reduce(loss_mean)
        out[case] = {
            "weights": sel.weights,
            "loss": sel.loss.detach(),
            "loss_mean": loss_mean / world,
            "ce_grad": ce.grad,
            "param_grads": param_grads / world,
        }
    torch.save(out, results / f"{task['name']}.rank{r}.pt")


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = Path(spec["results"])
    results.mkdir(parents=True, exist_ok=True)
    for task in spec["tasks"]:
        if task["kind"] == "global_selection":
            run_global_selection(task, results)
        else:
            run_stage(task, results)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
