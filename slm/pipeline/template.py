"""`slm init pipeline`: a commented pipeline YAML for the user's own corpora, which `slm run FILE` runs end to end.

tokenizer (or an existing tokenizer directory) -> reference on the high-quality corpus -> score the training corpus
-> SLM and CLM pretraining at one budget -> eval of all three -> compare -> the selection report. The sizes are
small, so that the file runs in minutes on a CPU as written; its comments say which keys to grow for a real run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slm.errors import SlmError

# Backbone options that fit the template's 128-token rows (each streaming backbone's segment a quarter of a row).
BACKBONE_OPTIONS: dict[str, dict] = {
    "llama": {},
    "infini": {"segment_len": 32},
    "megalodon": {"chunk_len": 32},
    "fam": {"block_len": 32, "fam_len": 8},
    "beacon": {"window_len": 32, "condensing_ratio": 8, "max_beacon_windows": 128},
}

TEMPLATE = """\
# A pipeline for your own corpora, written by `slm init pipeline`; run it with `slm run @FILE@`.
#   tokenizer -> reference (high-quality corpus) -> score (training corpus) -> pretrain SLM and CLM
#   (the same budget) -> eval -> compare -> selection report
# Sizes are small so that it runs in a few minutes on a CPU; for a real run grow the model sizes, seq_len and
# max_steps (reference and the shared &budget / &student of pretraining), and vocab_size. Every stage writes
# under work_dir (override: --set work_dir=DIR); --set stages.NAME.key=value changes one stage's key, e.g.
#   slm run @FILE@ --set stages.pretrain_slm.selection.ratio=0.4
# A finished stage is skipped on a rerun; `slm run @FILE@ --from pretrain_slm` redoes it and the rest.
name: @NAME@
work_dir: @WORK_DIR@

stages:
@TOKENIZER_STAGE@
  # The reference model learns the high-quality (target-domain) corpus; its per-token loss is the baseline that
  # excess loss is measured against. It may differ from the student in backbone and size, never in tokenizer.
  - name: reference
    kind: reference
    config:
      out_dir: ${work_dir}/reference
      tokenizer: @TOKENIZER@
      corpus: {path: @REFERENCE_CORPUS@, text_field: @TEXT_FIELD@}
      validation: &validation {path: @VALIDATION@, text_field: @TEXT_FIELD@}
      model: {backbone: llama, hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 192}
      train: {seq_len: 128, micro_batch_size: 8, max_steps: 300, eval_every: 50, eval_batches: 4,
              checkpoint_every: 100, optim: {lr: 3.0e-3, warmup_steps: 20}}

  # Every token of the training corpus scored by the reference model, into Arrow shards
  # (`slm shards stats|inspect|verify ${work_dir}/shards` to look at them).
  - name: score
    kind: score
    config:
      out_dir: ${work_dir}/shards
      reference: ${work_dir}/reference/model
      corpus: {path: @TRAIN_CORPUS@, text_field: @TEXT_FIELD@}
      seq_len: 128                 # = pretraining's train.seq_len
      batch_size: 16
      documents_per_shard: 1000

  # SLM: the student trained on the top `ratio` of tokens by excess loss (RHO-1's selective loss).
  - name: pretrain_slm
    kind: pretrain
    config: &pretrain
      out_dir: ${work_dir}/pretrain_slm
      shards: ${work_dir}/shards
      validation: *validation
      model: &student {backbone: @BACKBONE@, hidden_size: 64, num_layers: 2, num_heads: 2,
                       intermediate_size: 192@OPTIONS@}
      train: &budget {seq_len: 128, micro_batch_size: 8, max_steps: 300, eval_every: 25, eval_batches: 4,
                      checkpoint_every: 100, optim: {lr: 3.0e-3, warmup_steps: 20}}
      selection: {enabled: true, mode: batch, ratio: 0.6}

  # CLM: the same student, data and budget (&pretrain: every key of pretrain_slm) with the plain causal-LM loss.
  - name: pretrain_clm
    kind: pretrain
    config:
      <<: *pretrain
      out_dir: ${work_dir}/pretrain_clm
      selection: {enabled: false}

  # Held-out loss on every row of the validation corpus (add `questions: FILE.jsonl` with `question` and
  # `answer` fields for exact-match domain accuracy).
  - name: eval_reference
    kind: eval
    config: &eval
      out_dir: ${work_dir}/eval_reference
      model: ${work_dir}/reference/model
      validation: *validation
      seq_len: 128

  - name: eval_slm
    kind: eval
    config:
      <<: *eval
      out_dir: ${work_dir}/eval_slm
      model: ${work_dir}/pretrain_slm/model

  - name: eval_clm
    kind: eval
    config:
      <<: *eval
      out_dir: ${work_dir}/eval_clm
      model: ${work_dir}/pretrain_clm/model

  # SLM against CLM: held-out curves against tokens, the tokens SLM needs to reach CLM's final held-out loss,
  # the eval figures side by side (comparison.json, comparison.md, learning_curves.png).
  - name: compare
    kind: compare
    config:
      out_dir: ${work_dir}/compare
      slm: ${work_dir}/pretrain_slm
      clm: ${work_dir}/pretrain_clm
      evals: {reference: "${work_dir}/eval_reference", slm: "${work_dir}/eval_slm", clm: "${work_dir}/eval_clm"}

  # What the selection keeps, no ground truth needed (report.html, report.json): loss histograms, share kept per
  # source (the corpus's `source` column, else its files), documents most and least kept, token strings most kept
  # and dropped, both held-out curves. Excess loss against the SLM model at the end of training; without `model`,
  # the reference-only view (the lowest reference losses kept). Also `slm shards report DIR --ratio R --out DIR`.
  - name: report
    kind: shards_report
    config:
      out_dir: ${work_dir}/report
      shards: ${work_dir}/shards
      ratio: 0.6
      model: ${work_dir}/pretrain_slm/model
      corpus: {path: @TRAIN_CORPUS@, text_field: @TEXT_FIELD@}
      slm_run: ${work_dir}/pretrain_slm
      clm_run: ${work_dir}/pretrain_clm
"""

TOKENIZER_STAGE = """\
  # A byte-level BPE trained on both corpora (the same as `slm data tokenizer`). To use an existing tokenizer
  # instead (any AutoTokenizer directory with an EOS token), delete this stage and set `tokenizer:` below.
  - name: tokenizer
    kind: tokenizer
    config:
      out_dir: ${work_dir}/tokenizer
      corpus: [{path: @REFERENCE_CORPUS@, text_field: @TEXT_FIELD@}, {path: @TRAIN_CORPUS@, text_field: @TEXT_FIELD@}]
      vocab_size: @VOCAB_SIZE@

"""


def _corpus_path(path: str, what: str) -> str:
    """A local corpus as an absolute path (so the file runs from any directory); a hub name as it is."""
    from slm.data.corpus import resolve_files

    try:
        local = resolve_files(path)
    except SlmError as e:
        raise SlmError(f"{what} {path!r}: {str(e).split(': ', 1)[-1]}") from None
    return str(Path(path).resolve()) if local is not None else path


def render_pipeline(
    reference_corpus: str,
    train_corpus: str,
    validation: str,
    out: str | Path,
    backbone: str = "infini",
    text_field: str = "text",
    tokenizer: str | None = None,
    vocab_size: int = 2048,
    work_dir: str | None = None,
) -> str:
    """The pipeline YAML text (see TEMPLATE); `tokenizer` set: that directory instead of a tokenizer stage."""
    from slm.data.tokenizer import check_vocab_size
    from slm.models import get_backbone

    get_backbone(backbone)  # an unknown name: one line naming the registered ones
    out = Path(out)
    q = json.dumps  # JSON strings are YAML strings: any path quoted safely
    options = BACKBONE_OPTIONS.get(backbone, {})
    if tokenizer is None:
        check_vocab_size(vocab_size, "--vocab-size")
        tokenizer_stage, tokenizer_dir = TOKENIZER_STAGE, "${work_dir}/tokenizer"
    else:
        if not Path(tokenizer).is_dir():
            raise SlmError(f"--tokenizer {tokenizer!r}: directory not found")
        tokenizer_stage, tokenizer_dir = "", q(str(Path(tokenizer).resolve()))
    fills = {
        "@TOKENIZER_STAGE@\n": tokenizer_stage,
        "@FILE@": str(out),
        "@NAME@": q(out.stem),
        "@WORK_DIR@": q(work_dir or f"runs/{out.stem}"),
        "@TOKENIZER@": tokenizer_dir,
        "@REFERENCE_CORPUS@": q(_corpus_path(reference_corpus, "--reference-corpus")),
        "@TRAIN_CORPUS@": q(_corpus_path(train_corpus, "--train-corpus")),
        "@VALIDATION@": q(_corpus_path(validation, "--validation")),
        "@TEXT_FIELD@": q(text_field),
        "@BACKBONE@": backbone,
        "@OPTIONS@": f", options: {json.dumps(options)}" if options else "",
        "@VOCAB_SIZE@": str(vocab_size),
    }
    text = TEMPLATE
    for key, value in fills.items():
        text = text.replace(key, value)
    return text


def write_pipeline(out: str | Path, overwrite: bool = False, **kwargs) -> Path:
    """Render the template, check that `slm run` accepts it (every stage's config validates), write it atomically."""
    from slm.pipeline.load import load_pipeline
    from slm.utils.io import atomic_write_text

    out = Path(out)
    if out.exists() and not overwrite:
        raise SlmError(f"{out}: already exists; use --force to overwrite it")
    text = render_pipeline(out=out, **kwargs)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.check.yaml")
    try:
        atomic_write_text(tmp, text)
        load_pipeline(tmp)  # a template that does not validate is a bug here, not the user's
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
