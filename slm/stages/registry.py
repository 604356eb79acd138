"""The one registry of stage kinds: what the CLI, `slm run` and `slm jobs` read.

Each `Stage` declares, once: its config class (`slm.config.STAGE_CONFIGS`, the one config system), the module
whose `run(cfg, force=False, ...)` runs it (`slm.stages.<module>`), the CLI command that runs it on a config file
(what a rendered Slurm job calls: `<command> --config FILE`), the files it writes, its skip/resume rule, how a
cluster runs it (a multi-node training launcher, a job array, a stop at a safe point on preemption) and the key
figures `slm run` prints. A new kind is a config class, a stage module and one entry here; `tests/test_registry.py`
checks that every entry has its config, its module and its command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

from slm.config import STAGE_CONFIGS, StrictModel
from slm.errors import SlmError

# a key figure: (dotted metric in stage.json, the metrics naming what it covers, e.g. rows and tokens)
KeyFigure = tuple[str, tuple[str, ...]]
HELDOUT: KeyFigure = ("final_heldout_loss", ("final_heldout_rows", "final_heldout_tokens"))
SAME_CONFIG = "skipped when its stage.json records a finished run of this config; --force redoes it"
TRAINING_RESUME = (
    "skipped when finished for this config; after a crash or a stop it continues from the newest whole "
    "checkpoint (--resume never: from scratch)"
)


@dataclass(frozen=True)
class Stage:
    kind: str
    module: str  # slm.stages.<module>.run(cfg, force=False, ...)
    command: str  # the CLI command that runs it: `<command> --config FILE`
    outputs: tuple[str, ...]  # what it writes into out_dir besides stage.json and its lock
    skip: str  # the skip/resume rule, as its run implements it
    key_figures: tuple[KeyFigure, ...] = ()
    training: bool = False  # one launcher (DeepSpeed or torchrun) per node, multi-node
    array: bool = False  # a job array: task i runs part i of `parts`
    stoppable: bool = False  # stops at a safe point on SIGUSR1/SIGTERM or $SLM_STOP_FILE (slm.preempt)

    @property
    def config(self) -> type[StrictModel]:
        """The typed config its YAML (or a pipeline's `config:` block) is validated against."""
        return STAGE_CONFIGS[self.kind]

    @property
    def runner(self) -> Callable[..., dict]:
        """The stage's `run`: imported on first use, so that reading the registry loads no stage's dependencies."""
        return import_module(f"slm.stages.{self.module}").run

    def run(self, cfg: StrictModel, force: bool = False, **kwargs) -> dict:
        """Run (or skip) the stage on a validated config; returns its stage.json record."""
        return self.runner(cfg, force=force, **kwargs)


STAGES: dict[str, Stage] = {
    s.kind: s
    for s in (
        Stage(
            "demo_data",
            "demo_data",
            "slm data demo",
            ("hq.jsonl", "train.jsonl", "validation.jsonl", "questions.jsonl", "tokenizer/"),
            SAME_CONFIG,
        ),
        Stage(
            "real_text_data",
            "real_text_data",
            "slm data real-text",
            ("reference.jsonl", "train.jsonl", "validation.jsonl", "manifest.json"),
            SAME_CONFIG,
        ),
        Stage(
            "tokenizer",
            "tokenizer",
            "slm data tokenizer",
            ("tokenizer.json", "tokenizer_config.json"),
            SAME_CONFIG,
            (("vocab_size", ()),),
        ),
        Stage(
            "reference",
            "reference",
            "slm reference",
            ("model/", "checkpoints/", "metrics.jsonl", "learning_curve.png"),
            TRAINING_RESUME,
            (HELDOUT, ("tokens_seen", ())),
            training=True,
            stoppable=True,
        ),
        Stage(
            "finetune",
            "finetune",
            "slm finetune",
            ("model/", "checkpoints/", "metrics.jsonl", "learning_curve.png"),
            TRAINING_RESUME,
            (HELDOUT, ("tokens_seen", ())),
            training=True,
            stoppable=True,
        ),
        Stage(
            "score",
            "score",
            "slm score",
            ("manifest.json", "shard-NNNNN.arrow"),
            "whole shards are kept and a partial one is redone; finished when every part's shards are whole",
            (("tokens", ()), ("rows", ()), ("num_shards", ()), ("nan_tokens", ())),
            array=True,
            stoppable=True,
        ),
        Stage(
            "pretrain",
            "pretrain",
            "slm pretrain",
            ("model/", "checkpoints/", "metrics.jsonl", "learning_curve.png"),
            TRAINING_RESUME,
            (HELDOUT, ("tokens_seen", ()), ("kept_fraction", ())),
            training=True,
            stoppable=True,
        ),
        Stage(
            "eval",
            "evaluate",
            "slm eval",
            ("results.json", "answers.json"),
            SAME_CONFIG,
            (
                ("heldout_loss", ("heldout_rows", "heldout_tokens")),
                ("domain_accuracy", ()),
                ("selection.noise_dropped", ()),
                ("selection.kept_clean", ()),
            ),
        ),
        Stage(
            "compare",
            "compare",
            "slm compare",
            ("comparison.json", "comparison.md", "learning_curves.png"),
            "skipped when finished for this config and the input runs' stage.json are unchanged; else compared again",
            (
                ("slm_tokens_to_clm_final", ()),
                ("slm_token_ratio", ()),
                ("slm_final_heldout_loss", ()),
                ("clm_final_heldout_loss", ()),
                ("equal_budget", ()),
            ),
        ),
        Stage(
            "shards_report",
            "shards_report",
            "slm shards report",
            ("report.html", "report.json", "histograms.png", "learning_curves.png"),
            SAME_CONFIG,
            (("kept_fraction", ()), ("valid_tokens", ()), ("mean_ref_loss_kept", ())),
        ),
        Stage(
            "ruler",
            "ruler",
            "slm eval ruler",
            ("results.json", "predictions.jsonl", "heatmap_<task>.png", "average.png"),
            "skipped when finished for this config and the model's files are unchanged; after a crash the "
            "predictions already in predictions.jsonl are reused",
            (("effective_length", ()), ("samples", ())),
        ),
        Stage(
            "token_dynamics",
            "token_dynamics",
            "slm analyze token-dynamics",
            ("token_dynamics.json", "token_dynamics.png", "token_losses.npz"),
            "skipped when finished for this config and the same checkpoints (a run_dir with more whole "
            "checkpoints, or rewritten weights, is analysed again)",
            (("tokens", ()), *((f"shares.{c}", ()) for c in ("H->H", "L->H", "H->L", "L->L"))),
        ),
        Stage(
            "longrope_search",
            "longrope_search",
            "slm analyze longrope-search",
            ("rope_scaling.yaml (factors_file)", "search.json"),
            "skipped when finished for this config, the model's files are unchanged and the factors file exists",
            (("perplexity", ()), ("pi_perplexity", ())),
        ),
    )
}

if set(STAGES) != set(STAGE_CONFIGS):  # a kind with a config but no entry, or the reverse: a bug, said at import
    raise RuntimeError(
        f"slm.stages.registry: kinds {sorted(set(STAGES) ^ set(STAGE_CONFIGS))} are not both in STAGES and "
        "slm.config.STAGE_CONFIGS"
    )


def get_stage(kind: str) -> Stage:
    """The registered stage of `kind`, or a one-line error naming the kinds there are."""
    try:
        return STAGES[kind]
    except KeyError:
        raise SlmError(f"unknown stage kind {kind!r}; expected one of {list(STAGES)}") from None


def stage_runner(kind: str) -> Callable[..., dict]:
    return get_stage(kind).runner


def stage_config_class(kind: str) -> type[StrictModel]:
    return get_stage(kind).config
