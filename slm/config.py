"""The one config system: YAML files validated by typed pydantic models that reject unknown keys.

Every stage has a config class here. `load_config(path, Cls, overrides)` reads the YAML, applies
dotted `--set key=value` overrides, validates, and turns any problem into a one-line `SlmError`
that names the file, the key and what was expected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slm.errors import SlmError


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, never silent defaults."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


RUNTIME = {"fingerprint": False}  # json_schema_extra of a key that does not change results: not fingerprinted
# json_schema_extra of a key added after runs were made: while it holds its default (what those runs did) it is left
# out of the fingerprint, so their finished stages stay valid instead of being refused as another config's
ADDED = {"fingerprint": "unless_default"}

THREADS_HELP = (
    "torch threads for this stage; None: OMP_NUM_THREADS if set, else the CPUs the job was given "
    "(SLURM_CPUS_PER_TASK, else the process's CPU affinity) divided by the ranks on this host. "
    "Recorded in stage.json; not part of the config fingerprint."
)


def threads_field():
    return Field(None, ge=1, description=THREADS_HELP, json_schema_extra=RUNTIME)


# --------------------------------------------------------------------------- data


class CorpusConfig(StrictModel):
    """A text corpus read through `datasets` (memory-mapped, deterministic order)."""

    path: str | list[str] = Field(description="File, glob, list of files, directory, or hub dataset name.")
    format: Literal["auto", "jsonl", "json", "parquet", "text", "arrow"] = "auto"
    text_field: str = Field("text", description="Column holding the document text.")
    split: str = "train"
    max_documents: int | None = Field(None, ge=1, description="Read at most this many documents.")
    noise_field: str | None = Field(
        None,
        description="Column of [start, end) character spans tagged as noise (demo only; measured, never selected on).",
    )
    packing: Literal["concat", "whole", "single"] = Field(
        "concat",
        description="concat: documents joined by EOS and cut into rows; whole: a document that fits in a row "
        "never crosses into the next (the row is padded instead), as retrieval documents need; single: one "
        "document per row (padded), as fine-tuning examples are batched, so no other document is in view.",
    )
    completion_field: str | None = Field(
        None,
        description="A prompt/completion set (as TRL's): the column of text that follows text_field's. Its "
        "tokens are the completion (loss_mask 2), weighed against the rest by train.prompt_loss_weight.",
    )
    errors: Literal["strict", "replace"] = Field(
        "strict",
        description="Bytes that are not UTF-8 in jsonl, json or text files: strict: an error naming the file "
        "and byte offset; replace: read them as U+FFFD.",
    )


class DemoDataConfig(StrictModel):
    """Sizes of the embedded demo corpus (generated from `seed`, no downloads)."""

    out_dir: str
    seed: int = 1234
    hq_documents: int = Field(4000, ge=1, description="High-quality target-domain documents for the reference model.")
    train_documents: int = Field(6000, ge=1, description="Web-like training documents (domain mixed with noise).")
    validation_documents: int = Field(300, ge=1)
    questions: int = Field(200, ge=1, description="Held-out questions with exact answers (domain accuracy).")
    retrieval_share: float = Field(
        0.15, ge=0, le=1, description="Share of domain documents that are long-context retrieval."
    )
    noise_share: float = Field(0.4, ge=0, lt=1, description="Target share of noise characters in the training corpus.")
    retrieval_chars: int = Field(1200, ge=200, description="Length of a retrieval document in characters.")
    retrieval_short_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of the retrieval documents in hq/train/validation that are short (a needle a few tokens "
        "before its question): a model trained from scratch learns to copy from them (see the long-context demo).",
    )
    retrieval_kinds: list[Literal["passkey", "kv"]] = Field(
        ["passkey", "kv"],
        min_length=1,
        description="Kinds of retrieval document: pass key (a 5-digit key repeated in its needle) and key-value "
        "(four 3-digit keys with 4-digit values); each of two is drawn with probability 1/2.",
    )
    retrieval_finetune_documents: int = Field(
        0,
        ge=0,
        description="Standalone pass-key / key-value documents for a retrieval fine-tuning stage (retrieval.jsonl, "
        "pack them whole); 0: none. Drawn from their own seed; the tokenizer never sees them.",
    )
    retrieval_finetune_short_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of those that are short (a needle a few tokens before its question): a length "
        "curriculum; the rest are up to retrieval_chars long.",
    )
    retrieval_warmup_documents: int = Field(
        0,
        ge=0,
        description="Short pass-key / key-value pairs for a retrieval warm-up from scratch (retrieval_warmup.jsonl, "
        "prompt/completion like retrieval.jsonl, every one short); 0: none. A model that learned to copy on them "
        "before pretraining relearns it in a short fine-tuning; one pretrained without them did not (the demo).",
    )
    vocab_size: int = Field(2048, ge=300)


# --------------------------------------------------------------------------- model


class ModelConfig(StrictModel):
    """A causal LM: a registered backbone built from these sizes, or an existing HF checkpoint."""

    backbone: str = Field("llama", description="Registered backbone: llama, infini, megalodon, fam, beacon.")
    init_from: str | None = Field(None, description="Continue from this Hugging Face checkpoint directory.")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    intermediate_size: int = Field(384, ge=8)
    max_position_embeddings: int = Field(8192, ge=16)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = Field(
        None,
        description="transformers rope parameters, "
        "e.g. {rope_type: yarn, factor: 4, original_max_position_embeddings: 256}.",
    )
    tie_embeddings: bool = True
    options: dict[str, Any] = Field(default_factory=dict, description="Backbone-specific config keys.")


# --------------------------------------------------------------------------- training


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`."""

    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)
    gate_lr: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the long-range gates (infini beta, fam gamma); None: lr. Gates get no "
        "weight decay.",
    )


class TrainConfig(StrictModel):
    """The training loop on DeepSpeed (shared by `reference` and `pretrain`)."""

    seq_len: int = Field(256, ge=8)
    prompt_loss_weight: float = Field(
        1.0,
        ge=0,
        le=1,
        description="With a prompt/completion corpus (corpus.completion_field): the weight of a prompt token's loss "
        "against a completion token's (OpenAI's fine-tuning API had this knob); 0: completion only, 1: plain LM.",
    )
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(200, ge=1)
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: fp32 on CPU, bf16 on GPU.")
    seed: int = 0
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(
        4,
        ge=1,
        description="Size of the held-out sample evaluated every eval_every steps, in batches of micro_batch_size "
        "rows: a fixed sample spread evenly across the validation documents (seeded by eval_seed), not the "
        "file's first rows; all rows when the file has fewer. Its rows and tokens are in metrics.jsonl and "
        "stage.json.",
    )
    eval_seed: int = Field(0, description="Seed of the held-out sample (independent of `seed`, so runs compare).")
    final_eval: Literal["all", "sample"] = Field(
        "all",
        description="final_heldout_loss in stage.json: all: on every row of the validation file after the last "
        "step; sample: the last eval point's figure on the sample.",
    )
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    threads: int | None = threads_field()
    optim: OptimConfig = Field(default_factory=OptimConfig)


class SelectionConfig(StrictModel):
    """RHO-1 selective loss: keep the top `ratio` of valid tokens by excess loss (or, reference-free, by the
    student's own loss or entropy: self_loss, self_entropy)."""

    enabled: bool = True
    mode: Literal["sequence", "batch", "global", "soft", "static", "self_loss", "self_entropy"] = Field(
        "batch",
        description="Pool and score of the top-ratio cut. By excess loss (model loss - ref_loss): sequence (per "
        "row), batch (per micro-batch, RHO-1's default), global (across data-parallel ranks), soft (sigmoid "
        "weights around the cut); static: base_loss - ref_loss from the shards. Reference-free (ESLM), per "
        "micro-batch: self_loss (the student's own loss), self_entropy (its predictive entropy); no ref_loss read.",
    )
    ratio: float = Field(0.6, gt=0, le=1)
    temperature: float = Field(1.0, gt=0, description="Only for mode=soft: width of the sigmoid around the cut.")


# --------------------------------------------------------------------------- stages


class ReferenceConfig(StrictModel):
    """`slm reference`: train the reference model on high-quality text."""

    out_dir: str
    tokenizer: str = Field(description="Tokenizer directory (AutoTokenizer.from_pretrained).")
    corpus: CorpusConfig
    validation: CorpusConfig | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class FinetuneConfig(ReferenceConfig):
    """`slm finetune`: continue a checkpoint, or graft a backbone onto one (`model.init_from` + `model.backbone`), as a
    causal LM on a corpus: e.g. Infini-attention's pass-key fine-tuning. The same loop as `slm reference`."""

    @model_validator(mode="after")
    def _needs_a_checkpoint(self):
        if not self.model.init_from:
            raise ValueError("model.init_from: a fine-tuning stage starts from a checkpoint; set model.init_from")
        return self


class ScoreConfig(StrictModel):
    """`slm score`: per-token reference loss over the training corpus, into Arrow shards."""

    out_dir: str
    reference: str = Field(description="Reference model: Hugging Face checkpoint directory.")
    base_model: str | None = Field(None, description="Optional base model for static excess loss.")
    tokenizer: str | None = Field(None, description="Defaults to the reference's own tokenizer.")
    corpus: CorpusConfig
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(16, ge=1)
    documents_per_shard: int = Field(
        1000,
        ge=1,
        description="Documents packed into one shard: the unit of resume, of --part splits and of data-parallel ranks.",
    )
    logprob_chunk_tokens: int = Field(
        1024, ge=1, description="Tokens per chunk of the output projection; bounds the logits tensor to chunk x vocab."
    )
    part: int = Field(0, ge=0)
    parts: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int | None = threads_field()

    @model_validator(mode="after")
    def _part_in_range(self):
        if self.part >= self.parts:
            raise ValueError(f"part={self.part} must be < parts={self.parts}")
        return self


class PretrainConfig(StrictModel):
    """`slm pretrain`: train a backbone on token-score shards with the selective loss (or, reference-free, on a
    corpus: `corpus` instead of `shards`)."""

    out_dir: str
    shards: str | None = Field(None, description="The token-score shard directory (`slm score`).")
    corpus: CorpusConfig | None = Field(
        None,
        description="Instead of shards: a corpus, packed into train.seq_len rows (needs `tokenizer`); for the "
        "selection modes that read no reference loss (self_loss, self_entropy) and the CLM baseline.",
        json_schema_extra=ADDED,
    )
    tokenizer: str | None = Field(None, description="Defaults to the tokenizer directory recorded in the shards.")
    validation: CorpusConfig | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    verify_shards: Literal["full", "size"] = Field(
        "full",
        description="Start-up check of every listed shard: full: size and sha256; size: size only, and the "
        "sha256 when a shard is first read (faster start on large corpora).",
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.shards is None) == (self.corpus is None):
            raise ValueError("set exactly one of shards (token-score shards) and corpus (reference-free training)")
        if self.corpus is not None:
            if self.tokenizer is None:
                raise ValueError("corpus: training on a corpus needs tokenizer (a tokenizer directory)")
            sel = self.selection
            if sel.enabled and sel.ratio < 1.0 and sel.mode not in ("self_loss", "self_entropy"):
                raise ValueError(
                    f"corpus: selection.mode={sel.mode} needs the reference losses of token-score shards (shards:); "
                    "on a corpus use selection.mode self_loss or self_entropy, or selection.enabled: false"
                )
        return self


class EvalConfig(StrictModel):
    """`slm eval`: held-out loss, domain accuracy, and selection quality on the demo."""

    out_dir: str
    model: str = Field(description="Hugging Face checkpoint directory to evaluate.")
    validation: CorpusConfig | None = None
    questions: str | None = Field(None, description="jsonl with `question` and `answer` (exact match).")
    shards: str | None = Field(None, description="Shards with a noise column: measure selection precision/recall.")
    noise_corpus: CorpusConfig | None = Field(
        None,
        description="The corpus the shards were scored from, with `noise_field` and a `noise_kinds` field per span "
        "(the demo's train.jsonl): selection quality broken down by kind of noise.",
    )
    selection_ratio: float = Field(0.6, gt=0, le=1)
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)
    max_batches: int | None = Field(
        None,
        ge=1,
        description="None: held-out loss on every row of the validation file; else on a fixed sample of "
        "max_batches x batch_size rows spread evenly across its documents (and selection quality on the first "
        "max_batches x batch_size rows of the shards).",
    )
    max_new_tokens: int = Field(8, ge=1)
    verify_shards: Literal["full", "size"] = Field(
        "full",
        description="Start-up check of every listed shard: full: size and sha256; size: size only, and the "
        "sha256 when a shard is first read (faster start on large corpora).",
    )
    threads: int | None = threads_field()


class TokenizerConfig(StrictModel):
    """`slm data tokenizer`: a byte-level BPE (with EOS and PAD tokens) trained on any corpus slm reads, streamed;
    `out_dir` becomes a transformers tokenizer directory (`AutoTokenizer.from_pretrained(out_dir)`)."""

    out_dir: str = Field(description="The tokenizer directory: tokenizer.json, tokenizer_config.json, stage.json.")
    corpus: CorpusConfig | list[CorpusConfig] = Field(description="A corpus, or a list of corpora read in turn.")
    vocab_size: int = Field(
        description="Tokens in the vocabulary, special tokens included: at least 258 (256 byte symbols, EOS, PAD)."
    )

    @field_validator("vocab_size")
    @classmethod
    def _holds_the_bytes(cls, v: int) -> int:
        from slm.data.tokenizer import check_vocab_size

        try:
            check_vocab_size(v)
        except SlmError as e:
            raise ValueError(str(e)) from None
        return v

    @property
    def corpora(self) -> list[CorpusConfig]:
        return self.corpus if isinstance(self.corpus, list) else [self.corpus]


class CompareConfig(StrictModel):
    """`slm compare`: SLM against the CLM baseline from their finished pretrain runs: held-out curves against
    tokens, the tokens SLM needs to reach CLM's final held-out loss, and the eval stages' figures side by side."""

    out_dir: str
    slm: str = Field(description="out_dir of the SLM pretrain run (selective loss).")
    clm: str = Field(description="out_dir of the CLM baseline pretrain run (selection.enabled: false).")
    evals: dict[str, str] = Field(
        default_factory=dict, description="label -> out_dir of an eval stage; its figures join the table."
    )


class ShardsReportConfig(StrictModel):
    """`slm shards report`: one HTML page and JSON on what the selection keeps, with no ground-truth column."""

    out_dir: str
    shards: str = Field(description="The token-score shard directory.")
    ratio: float = Field(0.6, gt=0, le=1, description="Share of the sampled tokens kept (one cut over all of them).")
    model: str | None = Field(
        None,
        description="A causal LM on the shards' tokenizer: keep by excess loss (its loss - reference loss). Without "
        "one: by the shards' static excess (base_loss - ref_loss) when scored with a base model, else the "
        "reference-only proxy (the lowest reference losses).",
    )
    corpus: CorpusConfig | None = Field(
        None, description="The corpus the shards were scored from: share kept per source, documents most/least kept."
    )
    source_field: str = Field(
        "source", description="Column naming each document's source; where the corpus has none, its file."
    )
    max_rows: int = Field(512, ge=1, description="Rows read, spread evenly over the shard set.")
    batch_size: int = Field(8, ge=1)
    examples: int = Field(5, ge=1, description="Documents shown most kept and least kept.")
    min_tokens: int = Field(8, ge=1, description="Fewest sampled tokens of a document ranked most/least kept.")
    slm_run: str | None = Field(None, description="out_dir of the SLM pretrain run: its held-out curve joins the page.")
    clm_run: str | None = Field(None, description="out_dir of the CLM pretrain run: its held-out curve joins the page.")
    threads: int | None = threads_field()


class StageSpec(StrictModel):
    """One step of a pipeline: a stage kind and its config (same keys as the stage's own YAML)."""

    name: str
    kind: Literal[
        "demo_data", "tokenizer", "reference", "finetune", "score", "pretrain", "eval", "compare", "shards_report"
    ]
    config: dict[str, Any]
    slurm: dict[str, Any] = Field(default_factory=dict, description="Slurm resources for `slm jobs`.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError("stage names use letters, digits, '_', '-', '.'")
        return v


class PipelineConfig(StrictModel):
    """`slm run`: stages in order; `${work_dir}` in any string is replaced by `work_dir`."""

    name: str = "pipeline"
    work_dir: str
    stages: list[StageSpec]
    slurm: dict[str, Any] = Field(default_factory=dict, description="Cluster defaults for `slm jobs`.")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {sorted(dup)}")
        return self


STAGE_CONFIGS: dict[str, type[StrictModel]] = {
    "demo_data": DemoDataConfig,
    "reference": ReferenceConfig,
    "finetune": FinetuneConfig,
    "score": ScoreConfig,
    "pretrain": PretrainConfig,
    "eval": EvalConfig,
    "tokenizer": TokenizerConfig,
    "compare": CompareConfig,
    "shards_report": ShardsReportConfig,
}

# --------------------------------------------------------------------------- loading

C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (['train', 'lr'], 0.0003); the value is parsed as YAML."""
    if "=" not in item:
        raise SlmError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SlmError(f"--set {item!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    out = copy.deepcopy(raw)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, joined: '<source>: key `a.b`: <what was expected>'."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            msg = f"{e['msg']} (got {got_s})"
        problems.append(f"key '{key}': {msg}")
    return f"{source}: " + "; ".join(problems)


def validate(raw: dict, cls: type[C], source: str) -> C:
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise SlmError(format_validation_error(e, source)) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SlmError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SlmError(f"{path}: expected a mapping of config keys at the top level, got {type(raw).__name__}")
    return raw


def substitute(obj: Any, variables: dict[str, str]) -> Any:
    """Replace `${name}` in every string of a nested structure."""
    if isinstance(obj, str):
        return re.sub(r"\$\{(\w+)\}", lambda m: str(variables.get(m.group(1), m.group(0))), obj)
    if isinstance(obj, dict):
        return {k: substitute(v, variables) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, variables) for v in obj]
    return obj


def load_config(
    path: str | Path | None, cls: type[C], overrides: list[str] | None = None, base: dict | None = None
) -> C:
    """Read `path` (or start from `base`), apply `--set` overrides, validate against `cls`."""
    raw = read_yaml(path) if path is not None else dict(base or {})
    raw = apply_overrides(raw, overrides)
    source = str(path) if path is not None else "config"
    if overrides:
        source += " (with --set " + ", ".join(overrides) + ")"
    return validate(raw, cls, source)


def dump_config(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def _runtime_keys(cls: type[BaseModel]) -> dict:
    """The `exclude` spec of model_dump for the keys marked RUNTIME, nested configs included."""
    spec: dict = {}
    for name, info in cls.model_fields.items():
        if (info.json_schema_extra or {}).get("fingerprint") is False:
            spec[name] = True
        elif (
            isinstance(info.annotation, type)
            and issubclass(info.annotation, BaseModel)
            and (inner := _runtime_keys(info.annotation))
        ):
            spec[name] = inner
    return spec


def _added_at_default(cfg: BaseModel) -> dict:
    """The `exclude` spec of model_dump for the keys marked ADDED that hold their default, nested configs included."""
    spec: dict = {}
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if (info.json_schema_extra or {}).get("fingerprint") == "unless_default":
            if value == info.get_default(call_default_factory=True):
                spec[name] = True
        elif isinstance(value, BaseModel) and (inner := _added_at_default(value)):
            spec[name] = inner
    return spec


def _merge_exclude(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = True if out.get(k) is True or v is True else _merge_exclude(out.get(k) or {}, v)
    return out


def fingerprint_view(cfg: BaseModel) -> dict:
    """The config as its fingerprint sees it: `dump_config` without the runtime keys (threads), which change
    how fast a stage runs, not what it computes, and without the keys marked ADDED while they hold their default."""
    exclude = _merge_exclude(_runtime_keys(type(cfg)), _added_at_default(cfg))
    return cfg.model_dump(mode="json", exclude=exclude or None)
