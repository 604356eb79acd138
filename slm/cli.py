"""The typer app: it only parses and prints; each command calls the same function Python users call."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

import slm
from slm.config import load_config
from slm.errors import EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_BUG, EXIT_OK, SlmError, describe

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Selective Language Modeling (RHO-1) on long-context backbones: reference -> score -> pretrain -> eval.",
)
data_app = typer.Typer(no_args_is_help=True, help="Corpora: generate the embedded demo; train a tokenizer.")
shards_app = typer.Typer(no_args_is_help=True, help="Inspect, summarise, plot and verify token-score shards.")
jobs_app = typer.Typer(no_args_is_help=True, help="Render, submit and follow pipelines as Slurm jobs.")
analyze_app = typer.Typer(no_args_is_help=True, help="Analyses: LongRoPE factor search, RHO-1 token dynamics.")
init_app = typer.Typer(no_args_is_help=True, help="Start from a template: a pipeline for your own corpora.")
eval_app = typer.Typer(
    help="Evaluate a model: held-out loss, domain accuracy, selection quality; `ruler` for long context."
)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(shards_app, name="shards")
app.add_typer(jobs_app, name="jobs")
app.add_typer(analyze_app, name="analyze")
app.add_typer(init_app, name="init")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file.")
SetOpt = typer.Option(None, "--set", help="Override a config key: dotted.key=value (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Redo from scratch even if the output is complete.")


def _version(value: bool):
    if value:
        typer.echo(f"slm {slm.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
):
    pass


def _need_config(config: Path | None, cls):
    if config is None:
        raise SlmError(f"--config FILE is required (a YAML file of {cls.__name__} keys)")
    return config


def run_stage(kind: str, config: Path | None, set_: list[str] | None, force: bool, **kwargs) -> dict:
    """Run the registered stage `kind` (slm.stages.registry) on `--config FILE` with `--set` overrides: its
    config class validates the file, its `run` runs or skips it. Returns the stage.json record."""
    from slm.stages.registry import get_stage

    stage = get_stage(kind)
    return stage.run(load_config(_need_config(config, stage.config), stage.config, set_), force=force, **kwargs)


@data_app.command("demo")
def data_demo(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt, force: bool = ForceOpt):
    """Generate the embedded demo corpus (high-quality domain, noisy web corpus, held-out splits, tokenizer)."""
    from slm.stages.registry import get_stage

    stage = get_stage("demo_data")
    stage.run(load_config(config, stage.config, set_, base=None if config else {"out_dir": "runs/demo/data"}), force)


@data_app.command("real-text")
def data_real_text(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt, force: bool = ForceOpt):
    """Build the real-text corpus: this machine's manual pages and package documentation (reference, training
    with junk spans inserted, held-out), deterministic for a seed and a machine (slm.data.real_text)."""
    from slm.stages.registry import get_stage

    stage = get_stage("real_text_data")
    base = None if config else {"out_dir": "runs/real-text/data"}
    stage.run(load_config(config, stage.config, set_, base=base), force)


@data_app.command("tokenizer")
def data_tokenizer(
    corpus: list[str] | None = typer.Option(
        None, "--corpus", help="Corpus: file, glob or directory of jsonl/json/parquet/txt/arrow (repeatable)."
    ),
    text_field: str | None = typer.Option(None, "--text-field", help="Column holding the text (default: text)."),
    vocab_size: int | None = typer.Option(None, "--vocab-size", help="Vocabulary size, special tokens included."),
    out: Path | None = typer.Option(None, "--out", help="Tokenizer directory to write."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    force: bool = ForceOpt,
):
    """Train a byte-level BPE (EOS and PAD tokens) on any corpus slm reads, streamed, into a transformers
    tokenizer directory (AutoTokenizer.from_pretrained(DIR))."""
    from slm.config import apply_overrides, read_yaml, validate
    from slm.stages.registry import get_stage

    stage = get_stage("tokenizer")
    raw = read_yaml(config) if config else {}
    if corpus:
        corpora = [{"path": c, **({"text_field": text_field} if text_field else {})} for c in corpus]
        raw["corpus"] = corpora[0] if len(corpora) == 1 else corpora
    elif text_field:
        raise SlmError("--text-field names the text column of each --corpus; give --corpus too")
    if vocab_size is not None:
        raw["vocab_size"] = vocab_size
    if out is not None:
        raw["out_dir"] = str(out)
    if not config and not (corpus and vocab_size is not None and out):
        raise SlmError(
            "slm data tokenizer: --corpus PATH, --vocab-size N and --out DIR are required (or --config FILE)"
        )
    stage.run(validate(apply_overrides(raw, set_), stage.config, str(config or "slm data tokenizer")), force=force)


@app.command()
def reference(
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    force: bool = ForceOpt,
    resume: str = typer.Option(
        "auto", "--resume", help="auto: continue from the newest whole checkpoint; never: start fresh."
    ),
):
    """Train the reference model on high-quality text (from sizes or from a Hugging Face checkpoint)."""
    run_stage("reference", config, set_, force, resume=_resume(resume))


@app.command()
def finetune(
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    force: bool = ForceOpt,
    resume: str = typer.Option(
        "auto", "--resume", help="auto: continue from the newest whole checkpoint; never: start fresh."
    ),
):
    """Continue a checkpoint, or graft a long-context backbone onto one (model.init_from + model.backbone),
    on a corpus."""
    run_stage("finetune", config, set_, force, resume=_resume(resume))


@app.command()
def score(
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    force: bool = ForceOpt,
    part: int | None = typer.Option(None, "--part", help="This task's part (0-based), e.g. $SLURM_ARRAY_TASK_ID."),
    parts: int | None = typer.Option(None, "--parts", help="Number of parts the corpus is split into."),
):
    """Score every token of the training corpus with the reference model into Arrow shards."""
    extra = [f"part={part}"] * (part is not None) + [f"parts={parts}"] * (parts is not None)
    run_stage("score", config, (set_ or []) + extra, force)


@app.command()
def pretrain(
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    force: bool = ForceOpt,
    resume: str = typer.Option(
        "auto", "--resume", help="auto: continue from the newest whole checkpoint; never: start fresh."
    ),
):
    """Pretrain a backbone on token-score shards with the selective loss (selection.enabled=false: baseline)."""
    run_stage("pretrain", config, set_, force, resume=_resume(resume))


@eval_app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context, config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt, force: bool = ForceOpt
):
    """Held-out loss, domain accuracy and (on the demo) selection precision/recall; JSON and a table."""
    if ctx.invoked_subcommand is not None:
        return
    run_stage("eval", config, set_, force)


@eval_app.command("ruler")
def eval_ruler(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt, force: bool = ForceOpt):
    """RULER-style long-context tasks: scores per task x length, effective context length, heatmaps."""
    from slm.evaluation.ruler import summary_table
    from slm.utils.io import read_json

    record = run_stage("ruler", config, set_, force)
    typer.echo(summary_table(read_json(record["outputs"]["results"])))


@eval_app.command("harness")
def eval_harness(
    model: Path = typer.Option(..., "--model", help="Model directory (any slm export)."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval task names."),
    out: Path = typer.Option(..., "--out", help="Where results.json and samples.jsonl go."),
    include_path: Path | None = typer.Option(None, "--include-path", help="Directory of local task YAMLs."),
    batch_size: int = typer.Option(1, "--batch-size"),
    max_length: int | None = typer.Option(None, "--max-length", help="Default: the model's max_position_embeddings."),
    limit: int | None = typer.Option(None, "--limit", help="At most this many documents per task."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot"),
    device: str = typer.Option("cpu", "--device"),
):
    """lm-evaluation-harness on an slm export (its `hf` model; local task YAMLs with --include-path)."""
    from slm.evaluation.harness import run_harness

    results = run_harness(
        model,
        [t.strip() for t in tasks.split(",") if t.strip()],
        out,
        include_path,
        batch_size,
        max_length,
        limit,
        num_fewshot,
        device,
    )
    for task, metrics in results.items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        typer.echo(f"{task}: {shown}")


@app.command()
def run(
    pipeline: Path | None = typer.Argument(None, help="Pipeline YAML; default: the built-in demo."),
    set_: list[str] | None = SetOpt,
    force: bool = ForceOpt,
    from_stage: str | None = typer.Option(None, "--from", help="Redo this stage and every later one."),
):
    """Run a whole pipeline (default: the embedded demo), skipping stages that are already complete."""
    from slm.pipeline import run_pipeline

    run_pipeline(pipeline, set_, from_stage=from_stage, force=force)


@app.command()
def compare(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt, force: bool = ForceOpt):
    """SLM against the CLM baseline from their pretrain runs: held-out curves, tokens SLM needs to reach CLM's
    final held-out loss, eval figures side by side (comparison.json, comparison.md, learning_curves.png)."""
    run_stage("compare", config, set_, force)


@init_app.command("pipeline")
def init_pipeline(
    reference_corpus: str = typer.Option(..., "--reference-corpus", help="High-quality corpus for the reference."),
    train_corpus: str = typer.Option(..., "--train-corpus", help="Training corpus to score and select from."),
    validation: str = typer.Option(..., "--validation", help="Held-out corpus for every loss figure."),
    out: Path = typer.Option(..., "--out", help="The pipeline YAML to write."),
    backbone: str = typer.Option("infini", "--backbone", help="The student's registered backbone."),
    text_field: str = typer.Option("text", "--text-field", help="Column holding the text in every corpus."),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="An existing tokenizer directory (no tokenizer stage then)."
    ),
    vocab_size: int = typer.Option(2048, "--vocab-size", help="Vocabulary of the tokenizer stage."),
    work_dir: str | None = typer.Option(None, "--work-dir", help="Where the stages write (default: runs/<name>)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file."),
):
    """Write a commented pipeline (tokenizer, reference, score, SLM and CLM pretraining at one budget, eval, compare)
    for your own corpora; `slm run FILE` runs it end to end."""
    from slm.pipeline.template import write_pipeline

    path = write_pipeline(
        out,
        overwrite=force,
        reference_corpus=reference_corpus,
        train_corpus=train_corpus,
        validation=validation,
        backbone=backbone,
        text_field=text_field,
        tokenizer=str(tokenizer) if tokenizer else None,
        vocab_size=vocab_size,
        work_dir=work_dir,
    )
    typer.echo(f"wrote {path}; run it with: slm run {path}")


def _resume(value: str) -> bool:
    if value not in ("auto", "never"):
        raise SlmError(f"--resume {value!r}: expected auto or never")
    return value == "auto"


# ----------------------------------------------------------------------------- shards


@shards_app.command("verify")
def shards_verify(
    directory: Path = typer.Argument(..., help="Shard directory."),
    quick: bool = typer.Option(False, "--quick", help="Check sizes and schemas, skip sha256 and token counts."),
):
    """Check schema, metadata, checksums and counts; name every bad or unlisted shard (exit 2 when any)."""
    from slm.shards.reader import leftover_temp_files, verify_shards

    problems = verify_shards(directory, check_sha=not quick)
    for p in problems:
        typer.echo(f"BAD {p}")
    for tmp in leftover_temp_files(directory):
        typer.echo(
            f"WARN {tmp.relative_to(directory)}: leftover temp file of an interrupted write; "
            "not part of the data, safe to delete"
        )
    if problems:
        typer.echo(
            f"{directory}: {len(problems)} problem(s); rerun `slm score` with the same config to repair", err=True
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    typer.echo(f"{directory}: all shards whole")


@shards_app.command("inspect")
def shards_inspect(
    directory: Path = typer.Argument(...),
    row: int = typer.Option(0, "--row"),
    model: Path | None = typer.Option(None, "--model", help="Colour by excess loss of this model."),
    threshold: float | None = typer.Option(None, "--threshold", help="Keep tokens with excess >= threshold."),
    ratio: float | None = typer.Option(None, "--ratio", help="Keep the top ratio of the row by excess."),
    html: Path | None = typer.Option(None, "--html", help="Also write the view as an HTML page."),
):
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
def shards_stats(
    directory: Path = typer.Argument(...),
    ratio: float = typer.Option(0.6, "--ratio"),
    json_out: Path | None = typer.Option(None, "--json"),
):
    """Token counts, score quantiles, per-shard figures, and noise separation where tagged."""
    from rich.console import Console

    from slm.shards import ShardSet
    from slm.shards.stats import print_stats, shard_stats
    from slm.utils.io import atomic_write_json

    stats = shard_stats(ShardSet(directory, require_complete=False), ratio=ratio)
    print_stats(stats, Console())
    if json_out:
        atomic_write_json(json_out, stats)


@shards_app.command("report")
def shards_report(
    directory: Path | None = typer.Argument(None, help="Shard directory."),
    ratio: float | None = typer.Option(None, "--ratio", help="Share of tokens kept (default 0.6)."),
    model: Path | None = typer.Option(None, "--model", help="Keep by excess loss of this model."),
    corpus: str | None = typer.Option(None, "--corpus", help="The corpus the shards were scored from."),
    text_field: str | None = typer.Option(None, "--text-field", help="Its text column (default: text)."),
    source_field: str | None = typer.Option(None, "--source-field", help="Its source column (default: source)."),
    max_rows: int | None = typer.Option(None, "--max-rows", help="Rows sampled evenly (default 512)."),
    slm_run: Path | None = typer.Option(None, "--slm-run", help="SLM pretrain run: its held-out curve."),
    clm_run: Path | None = typer.Option(None, "--clm-run", help="CLM pretrain run: its held-out curve."),
    out: Path | None = typer.Option(None, "--out", help="Folder for report.html, report.json and the plots."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    force: bool = ForceOpt,
):
    """One HTML page (and JSON) on what the selection keeps, without any ground-truth column: loss histograms,
    share kept per source, documents most and least kept, token strings most kept and dropped, SLM vs CLM curves."""
    from slm.config import apply_overrides, read_yaml, validate
    from slm.stages.registry import get_stage

    stage = get_stage("shards_report")
    raw = read_yaml(config) if config else {}
    flags = {"shards": directory, "ratio": ratio, "model": model, "max_rows": max_rows, "out_dir": out}
    flags.update(source_field=source_field, slm_run=slm_run, clm_run=clm_run)
    raw.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})
    if corpus:
        raw["corpus"] = {"path": corpus, **({"text_field": text_field} if text_field else {})}
    elif text_field:
        raise SlmError("--text-field names the text column of --corpus; give --corpus too")
    if not config and not (directory and out):
        raise SlmError("slm shards report: DIR and --out DIR are required (or --config FILE)")
    stage.run(validate(apply_overrides(raw, set_), stage.config, str(config or "slm shards report")), force=force)


@shards_app.command("plot")
def shards_plot(directory: Path = typer.Argument(...), out: Path = typer.Option(Path("ref_loss_hist.png"), "--out")):
    """Write a histogram PNG of reference loss (noise vs clean where tagged)."""
    from slm.shards import ShardSet
    from slm.shards.stats import plot_histogram

    typer.echo(f"wrote {plot_histogram(ShardSet(directory, require_complete=False), out)}")


# ----------------------------------------------------------------------------- jobs

JobsOutOpt = typer.Option(..., "--out", help="Folder for the scripts, frozen configs, logs and jobs.json.")


@jobs_app.command("render")
def jobs_render(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (its `slurm:` blocks set the resources)."),
    out: Path = JobsOutOpt,
    set_: list[str] | None = SetOpt,
):
    """Write one sbatch script per stage (job array for scoring, multi-node launcher for training); submit nothing."""
    from slm.jobs import render_pipeline

    for job in render_pipeline(pipeline, out, set_):
        after = f" after {', '.join(job.depends_on)}" if job.depends_on else ""
        typer.echo(f"{job.stage:<16} {job.script}" + (f"  --array={job.array}" if job.array else "") + after)


@jobs_app.command("submit")
def jobs_submit(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML."),
    out: Path = JobsOutOpt,
    set_: list[str] | None = SetOpt,
):
    """Render and sbatch the unfinished stages, chained with afterok; rerun to resubmit only what is left."""
    from slm.jobs import submit_pipeline

    result = submit_pipeline(pipeline, out, set_)
    for stage, job in result["submitted"].items():
        after = f" after {', '.join(f'{s} ({i})' for s, i in job['depends_on'].items())}" if job["depends_on"] else ""
        redone = f"; its finished output was cleared: {result['redone'][stage]}" if stage in result["redone"] else ""
        typer.echo(
            f"{stage:<16} submitted job {job['job_id']}"
            + (f" --array={job['array']}" if job["array"] else "")
            + after
            + redone
        )
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
def longrope_search(
    model: Path | None = typer.Option(None, "--model", help="Llama checkpoint directory."),
    data: Path | None = typer.Option(None, "--data", help="Held-out text (jsonl/txt/parquet/arrow)."),
    target_len: int | None = typer.Option(None, "--target-len"),
    original_len: int | None = typer.Option(
        None, "--original-len", help="Training length (default: the model's max_position_embeddings)."
    ),
    samples: int | None = typer.Option(None, "--samples", help="Rows of --target-len tokens (default 4)."),
    population: int | None = typer.Option(None, "--population", help="Individuals per generation (default 16)."),
    generations: int | None = typer.Option(None, "--generations", help="Generations (default 8)."),
    seed: int | None = typer.Option(None, "--seed", help="Default 0."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Writes the factors as model.rope_scaling (YAML or JSON); default longrope.yaml, or with --config "
        "its out_dir/factors_file.",
    ),
    out_dir: Path | None = typer.Option(
        None, "--out-dir", help="The stage's folder (stage.json, search.json); default: --out without its suffix."
    ),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    force: bool = ForceOpt,
):
    """Evolutionary search of LongRoPE per-dimension rescale factors (Ding et al. 2024, Alg. 1)."""
    import os

    from slm.config import apply_overrides, read_yaml, validate
    from slm.stages.registry import get_stage

    stage = get_stage("longrope_search")
    raw = read_yaml(config) if config else {}
    flags = {"model": model, "target_len": target_len, "original_len": original_len, "samples": samples}
    flags.update(population=population, generations=generations, seed=seed, out_dir=out_dir)
    raw.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})
    if data is not None:
        base = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        raw["data"] = {**base, "path": str(data)}
    if out is not None or not config:  # the factors file at --out, as this command always wrote it
        out = out or Path("longrope.yaml")
        raw.setdefault("out_dir", str(out.with_suffix("")))
        raw["factors_file"] = os.path.relpath(out, raw["out_dir"])
    cfg = validate(apply_overrides(raw, set_), stage.config, str(config or "slm analyze longrope-search"))
    record = stage.run(cfg, force=force)
    m = record["metrics"]
    typer.echo(
        f"perplexity at {record['config']['target_len']}: {m['perplexity']:.3f} (PI {m['pi_perplexity']:.3f}); "
        f"wrote {record['outputs']['factors']}"
    )


@analyze_app.command("token-dynamics")
def token_dynamics(
    run_dir: Path | None = typer.Option(
        None, "--run", help="A reference/pretrain run directory: its whole checkpoints, in order."
    ),
    checkpoint: list[Path] | None = typer.Option(
        None, "--checkpoint", help="HF model directories in training order (repeatable)."
    ),
    validation: Path | None = typer.Option(None, "--validation", help="Validation text (jsonl/txt/parquet/arrow)."),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: the config's out_dir, else token_dynamics)."
    ),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    max_rows: int | None = typer.Option(None, "--max-rows"),
    seq_len: int | None = typer.Option(None, "--seq-len"),
    force: bool = ForceOpt,
):
    """RHO-1 token categories (H->H, L->H, H->L, L->L) over a series of checkpoints, with shares and a plot."""
    from slm.analysis.token_dynamics import token_dynamics_config
    from slm.stages.registry import get_stage

    cfg = token_dynamics_config(
        [str(c) for c in checkpoint] if checkpoint else None,
        str(run_dir) if run_dir else None,
        str(validation) if validation else None,
        str(out) if out else None,
        config=config,
        overrides=set_,
        max_rows=max_rows,
        seq_len=seq_len,
        out_default="token_dynamics",
    )
    get_stage("token_dynamics").run(cfg, force=force)


def _cli_exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(exit, abort, usage-error) exception classes: typer's own (recent typer, 0.29 here, runs on a vendored
    copy of click, `typer._click`, whose classes are not the click package's) and those of the click
    package where it is installed (older typer runs on it and re-exports its Exit and Abort)."""
    exits: list[type] = [typer.Exit]
    aborts: list[type] = [typer.Abort]
    errors: list[type] = []
    try:
        from typer.exceptions import TyperException

        errors.append(TyperException)  # base of the vendored click's ClickException
    except ImportError:
        pass
    try:
        import click
    except ImportError:
        pass
    else:
        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        errors.append(click.exceptions.ClickException)
    return tuple(exits), tuple(aborts), tuple(errors)


def run_cli(args: list[str] | None = None) -> int:
    """Run the app on `args` (default: sys.argv[1:]) and return the process exit status.

    0 ok; 2 bad input or bad data (SlmError, config and usage errors, a failed check); 1 a bug (an
    unexpected exception, shown with its traceback); 130 aborted. `--debug` adds the traceback of an
    SlmError. Every `typer.Exit(code)` a command raises becomes the status: with standalone_mode=False
    click does not exit but returns that code from `app(...)` (and raises its usage errors).
    """
    import traceback

    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args
    exits, aborts, usage_errors = _cli_exception_types()
    try:
        rv = app(args=args, prog_name="slm", standalone_mode=False)
    except SlmError as e:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        return getattr(e, "exit_code", EXIT_BAD_INPUT)
    except exits as e:  # a safety net: under standalone_mode=False click returns their code instead
        return _status(getattr(e, "exit_code", EXIT_OK))
    except (*aborts, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return EXIT_ABORTED
    except usage_errors as e:
        if not hasattr(e, "show"):
            typer.echo(f"error: {e}", err=True)
        elif type(e).__name__ != "NoArgsIsHelpError" or e.format_message():  # rich printed a bare group's help already
            e.show()  # the usage line, a hint and `Error: ...`
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 -- anything else is a bug: traceback and exit 1
        traceback.print_exc()
        typer.echo(f"error: {describe(e)} -- this is a bug in slm; please report it with the traceback above", err=True)
        return EXIT_BUG
    # `rv` is the exit code of a typer.Exit / ctx.exit() (typer turns Ctrl-C into Exit(130)), else what
    # the command returned: slm's commands return None, so only an int is a status
    code = _status(rv)
    if code == EXIT_ABORTED:
        typer.echo("aborted", err=True)
    return code


def _status(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else EXIT_OK


def main() -> None:
    """Console entry point: the status of `run_cli` becomes the process exit status."""
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
