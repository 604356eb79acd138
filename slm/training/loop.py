"""The training loop on DeepSpeed: shared by the reference and pretrain stages.

A stage supplies the model, the training rows, an optional held-out set and a `step_loss`
function (plain causal LM for the reference, the selective loss for pretraining). The loop owns
everything else: DeepSpeed set-up, deterministic batches, periodic evaluation, checkpoints with
fingerprints, resume, the non-finite guard, progress and metrics, and the Hugging Face export.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from slm.config import TrainConfig
from slm.data.packed import sample_rows
from slm.errors import SlmError
from slm.models.gates import gate_parameters, gate_stats
from slm.models.token_loss import token_losses
from slm.preempt import Interrupted, StopRequest
from slm.training import checkpoint as ckpt
from slm.training.distributed import (
    all_reduce_sum,
    all_reduce_tensor_sum,
    barrier,
    device,
    init_distributed,
    rank,
    world_size,
)
from slm.training.ds_config import deepspeed_config
from slm.training.loader import DeterministicLoader
from slm.training.metrics import MetricsLog
from slm.training.speed import autocast, compile_errors, prepare_model

StepLoss = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, dict]"]


def causal_lm_step(
    model, batch: dict, prompt_loss_weight: float = 1.0, completion_loss: bool = False
) -> tuple[torch.Tensor, dict]:
    """Causal-LM loss: the weighted mean token loss over valid (unpadded) positions,

        L = sum_t w_t * l_t / sum_t w_t,   w_t = 1 on completion tokens (loss_mask 2), prompt_loss_weight on the
                                           other tokens (loss_mask 1), 0 on padding (loss_mask 0),

    the plain mean when no row is a prompt/completion pair (corpus.completion_field) or the weight is 1.

    With `completion_loss` (a prompt/completion corpus) the extras hold `completion_loss`, the mean loss of the
    completion tokens alone (the figure a retrieval fine-tuning is about; NaN for a micro-batch without one), as a
    0-dim tensor: nothing here waits for the device, the loop reads the extras once per logging interval."""
    ce = token_losses(model, batch["input_ids"])
    mask = batch["loss_mask"]
    valid = torch.isfinite(ce) & mask.bool()
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    completion = valid & (mask == 2)
    weight = torch.where(completion, 1.0, prompt_loss_weight) * valid
    loss = (ce * weight).sum() / weight.sum().clamp_min(1e-12)  # no valid token: 0 / tiny = 0
    extra = {}
    if completion_loss:
        extra["completion_loss"] = (ce.detach() * completion).sum() / completion.sum()  # 0 / 0 = NaN: none here
    return loss, extra


def values_to_host(records, dev: torch.device) -> None:
    """Replace every tensor value in the dicts `records` by its Python float, all in one device-to-host copy (one
    host sync for a whole logging interval, however many steps and keys it holds)."""
    slots = [(r, k) for r in records for k, v in r.items() if isinstance(v, torch.Tensor)]
    if not slots:
        return
    values = torch.stack([r[k].detach().to(dev, torch.float64).reshape(()) for r, k in slots]).tolist()
    for (r, k), v in zip(slots, values):
        r[k] = v


@dataclass(frozen=True)
class Heldout:
    """A held-out loss and what it covers: `rows` rows, `tokens` predicted tokens (loss_mask 1, past position 0)."""

    loss: float
    rows: int
    tokens: int


@torch.no_grad()
def heldout_eval(model, rows, batch_size: int, dev: torch.device, indices=None) -> Heldout:
    """Token-weighted mean loss over the rows `indices` of `rows` (all rows when None), in batches of batch_size."""
    was_training = model.training
    model.eval()
    indices = np.arange(len(rows)) if indices is None else np.asarray(indices)
    total, count = 0.0, 0
    for start in range(0, len(indices), batch_size):
        batch = rows.rows(indices[start : start + batch_size], ("input_ids", "loss_mask"))
        ids = torch.from_numpy(batch["input_ids"]).long().to(dev)
        ce = token_losses(model, ids).float()
        valid = torch.isfinite(ce) & torch.from_numpy(batch["loss_mask"]).bool().to(dev)
        total += float(ce[valid].sum())
        count += int(valid.sum())
    model.train(was_training)
    return Heldout(total / max(count, 1), len(indices), count)


def heldout_loss(model, rows, batch_size: int, max_batches: int | None, dev: torch.device) -> float:
    """Token-weighted mean loss over the first max_batches*batch_size rows of `rows` (all when None)."""
    n = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
    return heldout_eval(model, rows, batch_size, dev, np.arange(n)).loss


def heldout_sample(rows, size: int, seed: int) -> np.ndarray:
    """The fixed held-out sample: `size` rows spread evenly across documents (see `sample_rows`); rows that record
    no documents count each row as its own document."""
    documents = rows.documents() if hasattr(rows, "documents") else np.arange(len(rows))
    return sample_rows(documents, size, seed)


def parameter_groups(model: torch.nn.Module, optim) -> list[dict]:
    """AdamW groups: the long-range gates with their own learning rate and no weight decay, then the rest."""
    gates = {id(p) for p in gate_parameters(model)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gates]
    groups = [{"params": rest}]
    gate_params = [p for p in model.parameters() if p.requires_grad and id(p) in gates]
    if gate_params:
        groups.append({"params": gate_params, "weight_decay": 0.0, "lr": optim.gate_lr or optim.lr})
    return groups


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    resumed_from: int | None
    final_heldout: Heldout | None  # on the whole validation file (train.final_eval: all) or the sample
    seconds: float
    history: list[dict] = field(default_factory=list)
    eval_sample: dict = field(default_factory=dict)  # what the eval points cover (`Trainer.heldout_metrics`)

    def heldout_summary(self) -> str:
        """One line: the final figure and what it covers, and the sample the eval points used."""
        f, e = self.final_heldout, self.eval_sample
        return (
            f"final held-out loss {f.loss:.4f} on {f.rows} rows / {f.tokens} tokens; eval points used a sample of "
            f"{e['eval_sample_rows']} rows / {e['eval_sample_tokens']} tokens from {e['eval_sample_documents']} of "
            f"{e['validation_documents']} documents ({e['validation_rows']} rows)"
        )

    def heldout_metrics(self) -> dict:
        """The held-out figures for stage.json, each with the rows and tokens it covers."""
        if self.final_heldout is None:
            return {"final_heldout_loss": None}
        return {
            "final_heldout_loss": self.final_heldout.loss,
            "final_heldout_rows": self.final_heldout.rows,
            "final_heldout_tokens": self.final_heldout.tokens,
            **self.eval_sample,
        }


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        out_dir: str | Path,
        train_rows,
        columns: tuple[str, ...],
        step_loss: StepLoss,
        fingerprints: dict[str, str],
        heldout_rows=None,
        stop_after: int | None = None,
    ):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.step_loss = step_loss
        self.fingerprints = fingerprints
        self.heldout_rows = heldout_rows
        # the rows every eval point covers: fixed for the run, spread evenly across the validation documents
        self.eval_indices = (
            None
            if heldout_rows is None
            else heldout_sample(heldout_rows, cfg.eval_batches * cfg.micro_batch_size, cfg.eval_seed)
        )
        self.stop_after = stop_after  # for tests: end the process as if killed after this step
        init_distributed()
        self.device = device()
        torch.manual_seed(cfg.seed)
        import deepspeed

        model = model.float()  # fp32 weights; bf16 is autocast (slm.training.ds_config)
        prepare_model(model, cfg)  # train.activation_checkpointing, train.compile (slm.training.speed)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=parameter_groups(model, cfg.optim), config=deepspeed_config(cfg, world_size())
        )
        self.loader = DeterministicLoader(
            train_rows, cfg.micro_batch_size, cfg.grad_accum, rank(), world_size(), cfg.seed, columns
        )
        self.metrics = MetricsLog(self.out_dir, enabled=rank() == 0)
        self._window, self._tokens_per_s = [0, time.time()], 0.0  # throughput since the last logging step
        self.ckpt_dir = self.out_dir / "checkpoints"

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def _client_state(self, step: int, tokens: int) -> dict:
        return {
            "step": step,
            "tokens_seen": tokens,
            "data_position": step * self.loader.global_batch,
            "fingerprints": self.fingerprints,
        }

    def _evaluate(self, whole: bool = False) -> Heldout | None:
        """Held-out loss on the fixed sample, or on every row of the validation file when `whole`."""
        if self.heldout_rows is None:
            return None
        indices = None if whole else self.eval_indices
        with compile_errors(self.cfg, self.model), autocast(self.engine):
            return heldout_eval(self.model, self.heldout_rows, self.cfg.micro_batch_size, self.device, indices)

    def _eval_sample_info(self, tokens: int | None) -> dict:
        rows = self.heldout_rows
        documents = rows.documents() if hasattr(rows, "documents") else np.arange(len(rows))
        return {
            "eval_sample_rows": len(self.eval_indices),
            "eval_sample_tokens": tokens,
            "eval_sample_documents": int(len(np.unique(documents[self.eval_indices]))),
            "eval_sample_seed": self.cfg.eval_seed,
            "validation_rows": len(rows),
            "validation_documents": getattr(rows, "num_documents", len(rows)),
        }

    def fit(self, resume: bool = True) -> TrainResult:
        cfg = self.cfg
        step, tokens, resumed_from = 0, 0, None
        if resume:
            client = ckpt.load_latest(self.engine, self.ckpt_dir, self.fingerprints)
            if client is not None:
                step, tokens, resumed_from = client["step"], client["tokens_seen"], client["step"]
        self.metrics.start(resumed_from)
        history: list[dict] = []
        started = time.time()
        bar = tqdm(
            total=cfg.max_steps,
            initial=step,
            desc=f"train {self.out_dir.name}",
            disable=rank() != 0,
            dynamic_ncols=True,
        )
        self.engine.train()
        with StopRequest() as stop:
            try:
                step, tokens = self._steps(step, tokens, history, bar, stop)
            finally:  # also when stopped (Interrupted) or failed: the metrics so far reach the file
                bar.close()
                self.metrics.close()
        final, sample_info = None, {}
        if self.heldout_rows is not None and step >= cfg.max_steps:
            last = history[-1] if history else {}
            if last.get("step") == step and last.get("heldout_tokens") is not None:  # evaluated at the last step
                sample = Heldout(last["heldout_loss"], last["heldout_rows"], last["heldout_tokens"])
            else:  # resumed from the last step's checkpoint
                sample = self._evaluate()
            final = self._evaluate(whole=True) if cfg.final_eval == "all" else sample
            sample_info = self._eval_sample_info(sample.tokens)
        return TrainResult(step, tokens, resumed_from, final, time.time() - started, history, sample_info)

    def _steps(self, step: int, tokens: int, history: list[dict], bar, stop: StopRequest) -> tuple[int, int]:
        """Optimizer steps from `step` to max_steps (or `stop_after`); on a stop request (slm.preempt), agreed by
        every rank after the step in progress, a whole checkpoint of that step and `Interrupted` (exit 3).

        Nothing here waits for the device per micro-step: each step's loss (summed in float64) and the step
        loss's extras stay device tensors in `pending` until `_flush` reads them all at once, every log_every
        steps and before every checkpoint. The non-finite guard is that read: a NaN or inf loss stops the run there
        (naming its step) before any checkpoint of that step or a later one is written; the steps in between do
        train on, and are discarded with the run."""
        cfg = self.cfg
        pending: list[tuple[int, dict]] = []
        self._window = [0, time.time()]  # tokens trained since the last logging step, and when that was
        while step < cfg.max_steps:
            skipped_before = self.engine.skipped_steps
            logs: dict = {}
            losses = []
            for micro in self.loader.micro_batches(step):
                micro = {k: v.to(self.device) for k, v in micro.items()}
                micro["input_ids"] = micro["input_ids"].long()
                with compile_errors(cfg, self.model), autocast(self.engine):
                    loss, extra = self.step_loss(self.engine, micro)
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.detach())
                for k, v in extra.items():
                    logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
                self._window[0] += micro["input_ids"].numel() * world_size()
            if self.engine.skipped_steps > skipped_before:
                self._flush(pending, history, bar)
                raise SlmError(
                    f"{self.out_dir}: DeepSpeed skipped optimizer step {step + 1} (overflow); "
                    "lower train.optim.lr or use precision fp32"
                )
            step += 1
            tokens += self.loader.global_batch * self.loader.source.seq_len
            record = {
                "loss": torch.stack(losses).double().sum() / cfg.grad_accum,  # this rank's; averaged in _flush
                "lr": self.engine.get_lr()[0],
                "tokens": tokens,
                **logs,
            }
            logged = step % cfg.log_every == 0 or step == cfg.max_steps
            if logged:
                record.update(gate_stats(self.model))
                record["tokens_per_s"] = None  # measured once the device has caught up (in _flush)
            if (step % cfg.eval_every == 0 or step == cfg.max_steps) and (held := self._evaluate()) is not None:
                record.update(heldout_loss=held.loss, heldout_rows=held.rows, heldout_tokens=held.tokens)
            pending.append((step, record))
            bar.update(1)
            saved = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
            ends = self.stop_after is not None and step >= self.stop_after
            if logged or saved or ends:
                self._flush(pending, history, bar)
            if saved:
                ckpt.save_checkpoint(
                    self.engine, self.ckpt_dir, step, self._client_state(step, tokens), cfg.keep_checkpoints
                )
            if ends:
                break
            why = stop.reason()
            if step < cfg.max_steps and all_reduce_sum(1.0 if why else 0.0) > 0:  # every rank stops at this step
                if not saved:
                    self._flush(pending, history, bar)
                    ckpt.save_checkpoint(
                        self.engine, self.ckpt_dir, step, self._client_state(step, tokens), cfg.keep_checkpoints
                    )
                raise Interrupted(
                    f"{self.out_dir}: stopped by {why or 'a stop request on another rank'} after step {step} of "
                    f"{cfg.max_steps}; whole checkpoint {ckpt.tag_for(step)} written; rerun the same command (or let "
                    f"Slurm requeue the job) to continue from it"
                )
        return step, tokens

    def _flush(self, pending: list[tuple[int, dict]], history: list[dict], bar) -> None:
        """Read the pending steps' device values in one transfer (the rank mean of the losses in one all-reduce),
        then log each step; the first step with a non-finite loss stops the run, once the steps before it are logged.

        A logging step's record holds `tokens_per_s: None`; it is measured here, after the read, when the device
        has finished the window's work."""
        if not pending:
            return
        steps, records = zip(*pending)
        pending.clear()
        losses = all_reduce_tensor_sum(torch.stack([r["loss"] for r in records])) / world_size()
        for r, loss in zip(records, losses):
            r["loss"] = loss
        values_to_host(records, self.device)
        if "tokens_per_s" in records[-1]:
            now = time.time()
            records[-1]["tokens_per_s"] = self._tokens_per_s = self._window[0] / max(now - self._window[1], 1e-9)
            self._window = [0, now]
        for step, record in zip(steps, records):
            if not math.isfinite(record["loss"]):
                raise SlmError(
                    f"{self.out_dir}: loss is {record['loss']} at step {step} (non-finite); "
                    "lower train.optim.lr or check the data; resume continues from the last whole checkpoint"
                )
            self.metrics.log(step, record)
            history.append({"step": step, **record})
        bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", tok_s=f"{self._tokens_per_s:.0f}")

    def export(self, out: str | Path, tokenizer=None) -> Path:
        """The trained model in Hugging Face format (with its tokenizer), gathered from ZeRO-3 shards."""
        import deepspeed

        out = Path(out)
        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
            if rank() == 0:
                tmp = out.with_name(out.name + ".tmp")
                if tmp.exists():
                    import shutil

                    shutil.rmtree(tmp)
                self.model.save_pretrained(str(tmp), safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                tmp.rename(out)
        barrier()
        return out


def learning_curve(history: list[dict], key: str = "heldout_loss") -> list[tuple[int, float]]:
    return [(h["tokens"], h[key]) for h in history if h.get(key) is not None and math.isfinite(h[key])]
