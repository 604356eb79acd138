"""The one config system: YAML files validated by typed pydantic models that reject unknown keys.

Every stage has a config class here. `load_config(path, Cls, overrides)` reads the YAML, applies
dotted `--set key=value` overrides, validates, and turns any problem into a one-line `SlmError`
that names the file, the key and what was expected.
"""

from __future__ import annotations

import copy
import re
import string
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slm.data import demo
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


class RealTextDataConfig(StrictModel):
    """A real-text corpus from the machine's manual pages and package documentation, mixed with junk
    (`slm.data.real_text`: sources, splits and junk kinds)."""

    out_dir: str
    seed: int = Field(0, description="Ranks the files (which split each is in) and draws the junk.")
    reference_documents: int = Field(1000, ge=1, description="Clean documents for the reference model.")
    train_documents: int = Field(1200, ge=1, description="Training documents, each with junk spans inserted.")
    validation_documents: int = Field(150, ge=1, description="Clean held-out documents.")
    junk_share: float = Field(0.3, ge=0, lt=1, description="Target share of junk characters in the training corpus.")
    max_chars: int = Field(8000, ge=500, description="A document is cut to this many characters at a paragraph end.")
    min_chars: int = Field(500, ge=1, description="A shorter rendered document is skipped.")
    max_per_family: int = Field(
        20, ge=1, description="At most this many documents of one command's pages or one package's documentation."
    )
    man_dirs: list[str] = Field(["/usr/share/man"], description="Manual page trees (their man1..man9 sections).")
    doc_dirs: list[str] = Field(["/usr/share/doc"], description="Package documentation trees (and HTML for markup).")
    binary_dirs: list[str] = Field(["/usr/bin"], description="Executables for hexdump junk.")
    library_dirs: list[str] = Field(
        ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu"],
        description="Shared libraries for symbols junk (missing directories are skipped).",
    )
    image_dirs: list[str] = Field(["/usr/share/icons", "/usr/share/pixmaps"], description="Images for base64 junk.")
    threads: int = Field(2, ge=1, description="Manual pages rendered at once.", json_schema_extra=RUNTIME)


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
    log_every: int = Field(
        10,
        ge=1,
        description="Steps per metrics read: the losses and the non-finite guard stay on the device in between "
        "(one host sync per interval and before each checkpoint); tokens_per_s and gate values on these steps.",
    )
    threads: int | None = threads_field()
    compile: bool = Field(
        False,
        description="torch.compile the decoder (inductor) before training; refused in one line where it cannot "
        "compile here.",
        json_schema_extra=RUNTIME,
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer in backward instead of keeping its activations (HF activation "
        "checkpointing); backbones without it (the streaming ones) are refused by name.",
        json_schema_extra=RUNTIME,
    )
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


class ReferenceModel(StrictModel):
    """One reference of a multi-reference `slm score` (an item of its `reference:` list)."""

    path: str = Field(description="Hugging Face checkpoint directory.")
    domain: str | None = Field(
        None,
        description="combine=min_per_domain only: the documents (those whose domain_field is this value) whose "
        "tokens this reference scores; None: every document's.",
    )


class ScoreConfig(StrictModel):
    """`slm score`: per-token reference loss over the training corpus, into Arrow shards."""

    out_dir: str
    reference: str | list[str | ReferenceModel] = Field(
        description="Reference model: a Hugging Face checkpoint directory, or a list of them (each a path or "
        "{path, domain}): with several, reference i's losses are column ref_loss_<i> and ref_loss is their "
        "combination (`combine`). A list of one is the single reference, shard for shard."
    )
    combine: Literal["max", "mean", "min_per_domain"] = Field(
        "max",
        description="With several references, ref_loss[t] from their losses L_i[t]: max: max_i L_i[t]; mean: "
        "(1/k) sum_i L_i[t]; min_per_domain: min over the references whose domain is the document's or unset. NaN "
        "from any reference that enters makes ref_loss NaN (the token is not selected).",
        json_schema_extra=ADDED,
    )
    domain_field: str = Field(
        "domain",
        description="combine=min_per_domain with declared domains: the corpus column naming each document's domain.",
        json_schema_extra=ADDED,
    )
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

    @field_validator("reference")
    @classmethod
    def _some_reference(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("an empty list: name at least one reference model directory")
        return v

    @model_validator(mode="after")
    def _domains_need_min_per_domain(self):
        declared = [i for i, r in enumerate(self.references) if r.domain is not None]
        if declared and self.combine != "min_per_domain":
            raise ValueError(
                f"reference.{declared[0]}.domain is set but combine={self.combine!r}: domains are used only by "
                "combine=min_per_domain; set combine: min_per_domain or drop the domain"
            )
        return self

    @property
    def references(self) -> list[ReferenceModel]:
        """`reference` as a list of ReferenceModel (a single path is a list of one)."""
        items = self.reference if isinstance(self.reference, list) else [self.reference]
        return [ReferenceModel(path=r) if isinstance(r, str) else r for r in items]


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


# --------------------------------------------------------------------------- token dynamics (slm.analysis)


class TokenDynamicsThresholds(StrictModel):
    """Thresholds of the RHO-1 rule (appendix, "Details of Token Categories")."""

    change: float = Field(
        0.2, ge=0, description="|fitted loss change| (nats) above which a token's loss counts as moving (paper: 0.2)."
    )
    level: float | None = Field(
        None,
        description="Loss at the last checkpoint separating high from low; "
        "null: the mean last-checkpoint loss of all tokens (paper's L_mean).",
    )


class TokenDynamicsConfig(StrictModel):
    """`slm analyze token-dynamics`: RHO-1 token categories (H->H, L->H, H->L, L->L) over checkpoints."""

    out_dir: str = Field(
        description="Writes token_dynamics.json, token_dynamics.png, token_losses.npz "
        "(and the packed rows under data/)."
    )
    checkpoints: list[str] | None = Field(None, description="Hugging Face model directories, in training order.")
    run_dir: str | None = Field(
        None, description="A reference/pretrain run: its whole DeepSpeed checkpoints (ZeRO 0-2), in step order."
    )
    architecture: str | None = Field(
        None,
        description="With run_dir: HF model directory whose architecture the checkpoints share "
        "(default <run_dir>/model).",
    )
    tokenizer: str | None = Field(
        None, description="Default: the first checkpoint's directory (or the architecture's, with run_dir)."
    )
    validation: CorpusConfig
    seq_len: int = Field(256, ge=8)
    max_rows: int = Field(64, ge=1, description="Analyse the first max_rows packed rows of the validation corpus.")
    batch_size: int = Field(8, ge=1)
    thresholds: TokenDynamicsThresholds = Field(default_factory=TokenDynamicsThresholds)
    x_axis: Literal["index", "step"] = Field(
        "index", description="Fit against checkpoint index (paper) or training step."
    )
    examples: int = Field(3, ge=0, description="Example tokens per category in the JSON and the plot.")
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_source(self):
        if (self.checkpoints is None) == (self.run_dir is None):
            raise ValueError("give exactly one of checkpoints (HF model directories) or run_dir (a training run)")
        if self.architecture is not None and self.run_dir is None:
            raise ValueError("architecture is only used with run_dir")
        return self


# --------------------------------------------------------------------------- LongRoPE search (slm.analysis.longrope)


class LongRopeSearchConfig(StrictModel):
    """`slm analyze longrope-search`: LongRoPE's evolutionary search of per-dimension RoPE rescale factors
    (Ding et al. 2024, Algorithm 1) against held-out perplexity at `target_len`; the best factors are written
    as a `model.rope_scaling` mapping."""

    out_dir: str = Field(description="Writes the factors file, search.json (the whole search) and stage.json.")
    model: str = Field(description="Llama-family Hugging Face checkpoint directory with plain RoPE (and tokenizer).")
    data: CorpusConfig = Field(description="Held-out text; its first `samples` packed rows of target_len tokens.")
    target_len: int = Field(ge=2, description="Length the factors extend the model to (L').")
    original_len: int | None = Field(
        None, ge=2, description="Length the model was trained at (L); None: its max_position_embeddings."
    )
    samples: int = Field(4, ge=1, description="Rows of target_len tokens whose perplexity is the fitness.")
    population: int = Field(16, ge=4, description="Individuals per generation (P).")
    generations: int = Field(8, ge=0, description="Evolution iterations after the initial population (T).")
    mutation_prob: float = Field(0.3, gt=0, le=1, description="Per-factor mutation probability (p).")
    seed: int = 0
    factors_file: str = Field(
        "rope_scaling.yaml",
        description="Where the factors go, relative to out_dir (or absolute): .yaml/.yml (with a comment on the "
        "search's perplexity) or .json; loads straight into model.rope_scaling.",
    )
    threads: int | None = threads_field()

    @field_validator("factors_file")
    @classmethod
    def _yaml_or_json(cls, v: str) -> str:
        if Path(v).suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"expected a .yaml, .yml or .json file name, got {v!r}")
        return v

    @model_validator(mode="after")
    def _longer(self):
        if self.original_len is not None and self.target_len <= self.original_len:
            raise ValueError(f"target_len={self.target_len} must exceed original_len={self.original_len}")
        return self


# --------------------------------------------------------------------------- RULER (slm.evaluation.ruler)

# RULER-style tasks; a task's generator lives in slm.evaluation.ruler.tasks
RULER_TASKS = (
    "passkey",
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
)


def check_placeholders(template: str, required: set[str], allowed: set[str]) -> str:
    """A format string must use every `required` placeholder and nothing outside `allowed`."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"not a valid format string ({e}): {template!r}") from None
    if "" in used or any(not n.isidentifier() for n in used):
        raise ValueError(f"use named placeholders only, got {template!r}")
    missing, unknown = required - used, used - allowed
    if missing:
        raise ValueError(f"{template!r} lacks placeholder(s) {sorted('{' + m + '}' for m in missing)}")
    if unknown:
        raise ValueError(
            f"{template!r} uses unknown placeholder(s) {sorted('{' + u + '}' for u in unknown)}; "
            f"allowed: {sorted(allowed)}"
        )
    return template


# field -> (required placeholders, allowed placeholders)
COMPACT_PLACEHOLDERS: dict[str, tuple[set[str], set[str]]] = {
    "passkey_needle": ({"key"}, {"key"}),
    "passkey_question": (set(), set()),
    "kv_needle": ({"k", "v"}, {"k", "v"}),
    "kv_question": ({"k"}, {"k"}),
    "kv_multi_question": ({"keys"}, {"keys"}),
    "vt_assign": ({"var", "value"}, {"var", "value"}),
    "vt_copy": ({"var", "src"}, {"var", "src"}),
    "vt_question": ({"value"}, {"value", "num"}),
    "cwe_item": ({"word"}, {"i", "word"}),
    "cwe_question": (set(), {"num"}),
    "fwe_question": (set(), {"num"}),
}


class CompactWording(StrictModel):
    """Short templates for tiny models (template_set=compact). Defaults follow the slm demo
    corpus (slm/data/demo.py): filler sentences with the needle inside, the question at the end,
    the answer right after it. Placeholders: {key} pass key; {k}, {v} key and value; {keys} the
    queried keys joined "a, b, and c"; {var}, {src}, {value} variable names and value; {num} how
    many answers are asked for; {i}, {word} a numbered word."""

    filler: list[str] = Field(
        default_factory=lambda: list(demo.FILLER),
        description="Haystack sentences, drawn at random (seeded) one after another.",
    )
    passkey_needle: str = demo.PASSKEY_NEEDLE
    passkey_question: str = demo.PASSKEY_QUESTION
    kv_needle: str = demo.KV_NEEDLE
    kv_question: str = demo.KV_QUESTION
    kv_multi_question: str = "What are the values of keys {keys}? The values of keys {keys} are"
    vt_assign: str = "VAR {var} = {value}."
    vt_copy: str = "VAR {var} = VAR {src}."
    vt_question: str = "Which variables are equal to {value}? They are"
    cwe_item: str = "{i}. {word}"
    cwe_question: str = "The {num} most common words are:"
    fwe_question: str = "The {num} most frequent words are:"
    key_kind: Literal["number", "word", "letters"] = Field("number", description="What a key looks like.")
    key_digits: int = Field(3, ge=1, le=12, description="Digits (number) or letters (letters) of a key.")
    value_digits: int = Field(4, ge=1, le=18, description="Digits of a key-value value.")

    @model_validator(mode="after")
    def _placeholders(self):
        for name, (required, allowed) in COMPACT_PLACEHOLDERS.items():
            try:
                check_placeholders(getattr(self, name), required, allowed)
            except ValueError as e:
                raise ValueError(f"compact.{name}: {e}") from None
        if not self.filler or not all(s.strip() for s in self.filler):
            raise ValueError("compact.filler must hold at least one non-empty sentence")
        return self


class TaskOptions(StrictModel):
    """Task sizes. Defaults are RULER's (Hsieh et al. 2024, Table/Appendix B)."""

    passkey_digits: int = Field(5, ge=1, le=18, description="Digits of the pass key (Landmark Attention: 5).")
    value_digits: int = Field(7, ge=1, le=18, description="Digits of a NIAH value with template_set=ruler (RULER: 7).")
    niah_values: Literal["numbers", "uuids"] = Field(
        "numbers", description="template_set=ruler: NIAH values as numbers or UUIDs."
    )
    multikey_keys: int = Field(
        4, ge=2, description="niah_multikey: needles in all; one is asked for, the rest distract."
    )
    multivalue_values: int = Field(4, ge=2, description="niah_multivalue: values stored under the one key.")
    multiquery_queries: int = Field(4, ge=2, description="niah_multiquery: keys asked for at once.")
    vt_chains: int = Field(1, ge=1, description="variable_tracking: chains of assignments (one is asked for).")
    vt_hops: int = Field(4, ge=1, description="variable_tracking: hops per chain (answer = hops + 1 variables).")
    cwe_common: int = Field(10, ge=1, description="common_words: words to find.")
    cwe_freq_common: int = Field(30, ge=2, description="common_words: repeats of each common word.")
    cwe_freq_uncommon: int = Field(3, ge=1, description="common_words: repeats of each other word.")
    fwe_alpha: float = Field(2.0, gt=1.0, description="frequent_words: Zipf exponent of word counts.")
    fwe_answers: int = Field(3, ge=1, description="frequent_words: words to find.")
    fwe_word_len: int = Field(5, ge=2, le=12, description="frequent_words: letters of a coded word.")

    @model_validator(mode="after")
    def _freqs(self):
        if self.cwe_freq_common <= self.cwe_freq_uncommon:
            raise ValueError(
                f"options.cwe_freq_common={self.cwe_freq_common} "
                f"must exceed options.cwe_freq_uncommon={self.cwe_freq_uncommon}"
            )
        return self


class RulerConfig(StrictModel):
    """`slm eval ruler`: RULER-style synthetic long-context tasks (Hsieh et al. 2024) and the
    pass-key test (Mohtashami & Jaggi 2023), each sample sized in the model's own tokenizer."""

    model: str = Field(description="Hugging Face checkpoint directory (AutoModelForCausalLM).")
    tokenizer: str | None = Field(None, description="Tokenizer directory; defaults to the model directory.")
    out_dir: str = Field(description="Where results.json, predictions.jsonl and the heatmaps go.")
    tasks: list[str] = Field(default_factory=lambda: list(RULER_TASKS), description=f"Any of {list(RULER_TASKS)}.")
    lengths: list[int] = Field(
        default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072],
        description="Target lengths in tokens (prompt + answer).",
    )
    samples_per_length: int = Field(
        25, ge=1, description="Samples per task and length; depth i cycles through `depths`."
    )
    depths: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], description="Needle depths (0 = start)."
    )
    template_set: Literal["ruler", "compact"] = Field(
        "ruler", description="ruler: RULER's wording; compact: short, for tiny models."
    )
    chunk_len: int = Field(2048, ge=1, description="Prompt tokens per forward pass (state carried between chunks).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="None: per task (RULER's budgets for ruler; answer length + 4 for compact)."
    )
    stop_at_newline: bool = Field(True, description="Stop decoding at a newline (and EOS); score the first line.")
    seed: int = 0
    threshold: float = Field(
        85.6, ge=0, le=100, description="Absolute threshold for the effective length (RULER: 85.6)."
    )
    relative_threshold: float | None = Field(
        None, gt=0, le=1, description="If set: threshold = this fraction of the score at the shortest length."
    )
    ci: Literal["wilson", "bootstrap"] = Field("wilson", description="95% interval of a task's mean score.")
    confidence: float = Field(0.95, gt=0, lt=1)
    device: str = Field("auto", description="auto: cuda when available, else cpu.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    resume: bool = Field(True, description="Reuse predictions.jsonl rows of an identical earlier run.")
    compact: CompactWording = Field(default_factory=CompactWording)
    options: TaskOptions = Field(default_factory=TaskOptions)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one task")
        unknown = [t for t in v if t not in RULER_TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; expected any of {list(RULER_TASKS)}")
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"task {dup[0]!r} is listed twice")
        return v

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one length")
        bad = [x for x in v if x < 1]
        if bad:
            raise ValueError(f"length {bad[0]} must be a positive number of tokens")
        if len(set(v)) != len(v):
            raise ValueError(f"lengths repeat: {v}")
        return sorted(v)

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one depth")
        bad = [x for x in v if not 0.0 <= x <= 1.0]
        if bad:
            raise ValueError(f"depth {bad[0]} must lie in [0, 1]")
        if len(set(v)) != len(v):
            raise ValueError(f"depths repeat: {v}")
        return v


class StageSpec(StrictModel):
    """One step of a pipeline: a stage kind and its config (same keys as the stage's own YAML)."""

    name: str
    kind: str = Field(description="A registered stage kind: a key of STAGE_CONFIGS (slm.stages.registry).")
    config: dict[str, Any]
    slurm: dict[str, Any] = Field(default_factory=dict, description="Slurm resources for `slm jobs`.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError("stage names use letters, digits, '_', '-', '.'")
        return v

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in STAGE_CONFIGS:
            raise ValueError(f"unknown stage kind {v!r}; expected one of {list(STAGE_CONFIGS)}")
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


# stage kind -> its config class; slm.stages.registry declares the rest of each kind (command, run, outputs)
STAGE_CONFIGS: dict[str, type[StrictModel]] = {
    "demo_data": DemoDataConfig,
    "real_text_data": RealTextDataConfig,
    "reference": ReferenceConfig,
    "finetune": FinetuneConfig,
    "score": ScoreConfig,
    "pretrain": PretrainConfig,
    "eval": EvalConfig,
    "tokenizer": TokenizerConfig,
    "compare": CompareConfig,
    "shards_report": ShardsReportConfig,
    "ruler": RulerConfig,
    "token_dynamics": TokenDynamicsConfig,
    "longrope_search": LongRopeSearchConfig,
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
