"""The typer app: it only parses and prints; each command calls the same function Python users call."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

import slm
from slm.config import DemoDataConfig, EvalConfig, PretrainConfig, ReferenceConfig, ScoreConfig, load_config
from slm.errors import SlmError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Selective Language Modeling (RHO-1) on long-context backbones: reference -> score -> pretrain -> eval.")
data_app = typer.Typer(no_args_is_help=True, help="Corpora: generate the embedded demo.")
shards_app = typer.Typer(no_args_is_help=True, help="Inspect, summarise, plot and verify token-score shards.")
jobs_app = typer.Typer(no_args_is_help=True, help="Render, submit and follow pipelines as Slurm jobs.")
analyze_app = typer.Typer(no_args_is_help=True, help="Analyses: LongRoPE factor search, RHO-1 token dynamics.")
eval_app = typer.Typer(help="Evaluate a model: held-out loss, domain accuracy, selection quality; `ruler` for long context.")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(shards_app, name="shards")
app.add_typer(jobs_app, name="jobs")
app.add_typer(analyze_app, name="analyze")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file.")
SetOpt = typer.Option(None, "--set", help="Override a config key: dotted.key=value (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Redo from scratch even if the output is complete.")


def _version(value: bool):
    if value:
        typer.echo(f"slm {slm.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
):
    pass


def _need_config(config: Optional[Path], cls):
    if config is None:
        raise SlmError(f"--config FILE is required (a YAML file of {cls.__name__} keys)")
    return config


@data_app.command("demo")
def data_demo(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt):
    """Generate the embedded demo corpus (high-quality domain, noisy web corpus, held-out splits, tokenizer)."""
    from slm.stages import demo_data

    cfg = load_config(config, DemoDataConfig, set_, base=None if config else {"out_dir": "runs/demo/data"})
    demo_data.run(cfg, force=force)


@app.command()
def reference(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt,
              resume: str = typer.Option("auto", "--resume", help="auto: continue from the newest whole checkpoint; never: start fresh.")):
    """Train the reference model on high-quality text (from sizes or from a Hugging Face checkpoint)."""
    from slm.stages import reference as stage

    stage.run(load_config(_need_config(config, ReferenceConfig), ReferenceConfig, set_), force=force, resume=_resume(resume))


@app.command()
def score(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt,
          part: Optional[int] = typer.Option(None, "--part", help="This task's part (0-based), e.g. $SLURM_ARRAY_TASK_ID."),
          parts: Optional[int] = typer.Option(None, "--parts", help="Number of parts the corpus is split into.")):
    """Score every token of the training corpus with the reference model into Arrow shards."""
    from slm.stages import score as stage

    extra = [f"part={part}"] * (part is not None) + [f"parts={parts}"] * (parts is not None)
    stage.run(load_config(_need_config(config, ScoreConfig), ScoreConfig, (set_ or []) + extra), force=force)


@app.command()
def pretrain(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt,
             resume: str = typer.Option("auto", "--resume", help="auto: continue from the newest whole checkpoint; never: start fresh.")):
    """Pretrain a backbone on token-score shards with the selective loss (selection.enabled=false: baseline)."""
    from slm.stages import pretrain as stage

    stage.run(load_config(_need_config(config, PretrainConfig), PretrainConfig, set_), force=force, resume=_resume(resume))


@eval_app.callback(invoke_without_command=True)
def evaluate(ctx: typer.Context, config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt):
    """Held-out loss, domain accuracy and (on the demo) selection precision/recall; JSON and a table."""
    if ctx.invoked_subcommand is not None:
        return
    from slm.stages import evaluate as stage

    stage.run(load_config(_need_config(config, EvalConfig), EvalConfig, set_), force=force)


@eval_app.command("ruler")
def eval_ruler(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """RULER-style long-context tasks: scores per task x length, effective context length, heatmaps."""
    from slm.evaluation.ruler import RulerConfig, run_ruler, summary_table

    typer.echo(summary_table(run_ruler(load_config(_need_config(config, RulerConfig), RulerConfig, set_), progress=True)))


@app.command()
def run(pipeline: Optional[Path] = typer.Argument(None, help="Pipeline YAML; default: the built-in demo."),
        set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt,
        from_stage: Optional[str] = typer.Option(None, "--from", help="Redo this stage and every later one.")):
    """Run a whole pipeline (default: the embedded demo), skipping stages that are already complete."""
    from slm.pipeline import run_pipeline

    run_pipeline(pipeline, set_, from_stage=from_stage, force=force)


def _resume(value: str) -> bool:
    if value not in ("auto", "never"):
        raise SlmError(f"--resume {value!r}: expected auto or never")
    return value == "auto"


# ----------------------------------------------------------------------------- shards


@shards_app.command("verify")
def shards_verify(directory: Path = typer.Argument(..., help="Shard directory."),
                  quick: bool = typer.Option(False, "--quick", help="Check sizes and schemas, skip sha256.")):
    """Check schema, metadata and checksums; name every bad shard (exit 1 when any)."""
    from slm.shards.reader import verify_shards

    problems = verify_shards(directory, check_sha=not quick)
    for p in problems:
        typer.echo(f"BAD {p}")
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{directory}: all shards whole")


@shards_app.command("inspect")
def shards_inspect(directory: Path = typer.Argument(...), row: int = typer.Option(0, "--row"),
                   model: Optional[Path] = typer.Option(None, "--model", help="Colour by excess loss of this model."),
                   threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep tokens with excess >= threshold."),
                   ratio: Optional[float] = typer.Option(None, "--ratio", help="Keep the top ratio of the row by excess."),
                   html: Optional[Path] = typer.Option(None, "--html", help="Also write the view as an HTML page.")):
    """Print one sequence's tokens coloured by reference loss (or excess loss / kept-dropped)."""
    from rich.console import Console

    from slm.data.tokenizer import load_tokenizer
    from slm.models import load_pretrained
    from slm.shards import ShardSet
    from slm.shards.inspect import print_row, render_row, write_html

    shards = ShardSet(directory, require_complete=False)
    tokenizer = load_tokenizer(shards.metadata.tokenizer_path)
    view = render_row(shards, row, tokenizer, load_pretrained(str(model)).eval() if model else None, threshold, ratio)
    print_row(view, Console())
    if html:
        write_html(view, html)
        typer.echo(f"wrote {html}")


@shards_app.command("stats")
def shards_stats(directory: Path = typer.Argument(...), ratio: float = typer.Option(0.6, "--ratio"),
                 json_out: Optional[Path] = typer.Option(None, "--json")):
    """Token counts, score quantiles, per-shard figures, and noise separation where tagged."""
    from rich.console import Console

    from slm.io import atomic_write_json
    from slm.shards import ShardSet
    from slm.shards.stats import print_stats, shard_stats

    stats = shard_stats(ShardSet(directory, require_complete=False), ratio=ratio)
    print_stats(stats, Console())
    if json_out:
        atomic_write_json(json_out, stats)


@shards_app.command("plot")
def shards_plot(directory: Path = typer.Argument(...), out: Path = typer.Option(Path("ref_loss_hist.png"), "--out")):
    """Write a histogram PNG of reference loss (noise vs clean where tagged)."""
    from slm.shards import ShardSet
    from slm.shards.stats import plot_histogram

    typer.echo(f"wrote {plot_histogram(ShardSet(directory, require_complete=False), out)}")


# ----------------------------------------------------------------------------- jobs

JobsOutOpt = typer.Option(..., "--out", help="Folder for the scripts, frozen configs, logs and jobs.json.")


@jobs_app.command("render")
def jobs_render(pipeline: Path = typer.Argument(..., help="Pipeline YAML (its `slurm:` blocks set the resources)."),
                out: Path = JobsOutOpt, set_: Optional[List[str]] = SetOpt):
    """Write one sbatch script per stage (job array for scoring, multi-node launcher for training); submit nothing."""
    from slm.jobs import render_pipeline

    for job in render_pipeline(pipeline, out, set_):
        after = f" after {', '.join(job.depends_on)}" if job.depends_on else ""
        typer.echo(f"{job.stage:<16} {job.script}" + (f"  --array={job.array}" if job.array else "") + after)


@jobs_app.command("submit")
def jobs_submit(pipeline: Path = typer.Argument(..., help="Pipeline YAML."), out: Path = JobsOutOpt,
                set_: Optional[List[str]] = SetOpt):
    """Render and sbatch the unfinished stages, chained with afterok; rerun to resubmit only what is left."""
    from slm.jobs import submit_pipeline

    result = submit_pipeline(pipeline, out, set_)
    for stage, job in result["submitted"].items():
        after = f" after {', '.join(f'{s} ({i})' for s, i in job['depends_on'].items())}" if job["depends_on"] else ""
        typer.echo(f"{stage:<16} submitted job {job['job_id']}" + (f" --array={job['array']}" if job["array"] else "") + after)
    for stage, job_id in result["reused"].items():
        typer.echo(f"{stage:<16} still queued as job {job_id}")
    for stage, why in result["skipped"].items():
        typer.echo(f"{stage:<16} skipped ({why})")
    typer.echo(f"job ids in {result['jobs_file']}")


@jobs_app.command("status")
def jobs_status(out: Path = JobsOutOpt):
    """Each stage's Slurm state beside its output (stage.json complete; shards whole for scoring)."""
    from rich.console import Console

    from slm.jobs.status import pipeline_status, print_status

    print_status(pipeline_status(out), Console())


# ----------------------------------------------------------------------------- analyze


@analyze_app.command("longrope-search")
def longrope_search(model: Path = typer.Option(..., "--model", help="Llama checkpoint directory."),
                    data: Path = typer.Option(..., "--data", help="Held-out text (jsonl/txt/parquet/arrow)."),
                    target_len: int = typer.Option(..., "--target-len"),
                    original_len: Optional[int] = typer.Option(None, "--original-len", help="Training length (default: the model's max_position_embeddings)."),
                    samples: int = typer.Option(4, "--samples"), population: int = typer.Option(16, "--population"),
                    generations: int = typer.Option(8, "--generations"), seed: int = typer.Option(0, "--seed"),
                    out: Path = typer.Option(Path("longrope.yaml"), "--out", help="Writes the factors as model.rope_scaling (YAML or JSON).")):
    """Evolutionary search of LongRoPE per-dimension rescale factors (Ding et al. 2024, Alg. 1)."""
    import torch

    from slm.config import CorpusConfig
    from slm.data.packed import packed_corpus
    from slm.data.tokenizer import load_tokenizer
    from slm.longrope import save_rope_scaling, search_longrope_factors
    from slm.models import load_pretrained

    net = load_pretrained(str(model)).float().eval()
    tokenizer = load_tokenizer(model)
    rows = packed_corpus(CorpusConfig(path=str(data)), tokenizer, str(model), target_len, out.parent / ".slm-cache")
    if len(rows) < 1:
        raise SlmError(f"{data}: not enough text for one row of {target_len} tokens")
    ids = torch.from_numpy(rows.rows(range(min(samples, len(rows))), ("input_ids",))["input_ids"]).long()
    orig = original_len or net.config.max_position_embeddings
    result = search_longrope_factors(net, ids, orig, target_len, population=population, generations=generations, seed=seed)
    save_rope_scaling(result, out)
    typer.echo(f"perplexity at {target_len}: {result['perplexity']:.3f} (PI {result['baselines']['pi']:.3f}); wrote {out}")


@analyze_app.command("token-dynamics")
def token_dynamics(run_dir: Optional[Path] = typer.Option(None, "--run", help="A reference/pretrain run directory: its whole checkpoints, in order."),
                   checkpoint: Optional[List[Path]] = typer.Option(None, "--checkpoint", help="HF model directories in training order (repeatable)."),
                   validation: Optional[Path] = typer.Option(None, "--validation", help="Validation text (jsonl/txt/parquet/arrow)."),
                   out: Path = typer.Option(Path("token_dynamics"), "--out"),
                   config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                   max_rows: Optional[int] = typer.Option(None, "--max-rows"), seq_len: Optional[int] = typer.Option(None, "--seq-len")):
    """RHO-1 token categories (H->H, L->H, H->L, L->L) over a series of checkpoints, with shares and a plot."""
    from slm.analysis.token_dynamics import token_dynamics_command

    token_dynamics_command([str(c) for c in checkpoint] if checkpoint else None, str(run_dir) if run_dir else None,
                           str(validation) if validation else None, str(out), config=config, overrides=set_, max_rows=max_rows, seq_len=seq_len)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2 (no traceback)."""
    import click

    debug = "--debug" in sys.argv
    try:
        app(prog_name="slm", standalone_mode=False)
    except SlmError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(SlmError.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
