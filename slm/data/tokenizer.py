"""Tokenizers: load any `AutoTokenizer` directory, fingerprint it, train a byte-level BPE (the demo's, or one on
any corpus slm reads: `slm data tokenizer`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from slm.errors import SlmError, describe
from slm.utils.io import sha256_dir

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
BYTE_ALPHABET = 256  # byte-level BPE starts from one symbol per byte value


def min_vocab_size() -> int:
    """The smallest vocabulary a byte-level BPE can have: every byte symbol plus the special tokens."""
    return BYTE_ALPHABET + len(SPECIAL_TOKENS)


def check_vocab_size(vocab_size: int, what: str = "vocab_size") -> None:
    """Refuse a vocabulary smaller than the byte alphabet + special tokens (the BPE trainer would silently make
    a larger one than asked for)."""
    if vocab_size < min_vocab_size():
        raise SlmError(
            f"{what}={vocab_size}: a byte-level BPE needs at least {min_vocab_size()} tokens "
            f"({BYTE_ALPHABET} byte symbols + {len(SPECIAL_TOKENS)} special tokens {', '.join(SPECIAL_TOKENS)}); "
            f"set {what} >= {min_vocab_size()}"
        )


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise SlmError(f"tokenizer {str(path)!r}: directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise SlmError(f"tokenizer {str(path)!r}: could not be loaded ({describe(e)})") from None
    if tok.eos_token_id is None:
        raise SlmError(
            f"tokenizer {str(path)!r}: has no EOS token; packing needs one between documents. Fix: set "
            f'"eos_token" in its tokenizer_config.json to a token of its vocabulary (for example "</s>" or '
            f'"<|endoftext|>"), or train one that has it with '
            f"`slm data tokenizer --corpus PATH --vocab-size N --out DIR`"
        )
    return tok


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 over the files that define the tokenizer (vocab, merges, config)."""
    return sha256_dir(path, ("tokenizer.json", "vocab.*", "merges.txt", "*.model", "special_tokens_map.json"))


def train_bpe_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int, out_dir: str | Path):
    """Byte-level BPE with single-digit pre-splitting (numbers tokenise digit by digit), EOS and PAD tokens, saved
    as a transformers tokenizer directory (`PreTrainedTokenizerFast`: tokenizer.json, tokenizer_config.json).

    `texts` is consumed once, lazily: strings or batches (lists) of strings. The trainer keeps only counts of the
    distinct pre-tokenized words, so memory follows the corpus's vocabulary, not its size.
    """
    check_vocab_size(vocab_size)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None)
    fast.model_max_length = 1 << 30
    save_tokenizer(fast, out_dir)
    return fast


def save_tokenizer(tok, out_dir: str | Path) -> Path:
    """`save_pretrained` into a temporary folder beside `out_dir`, then each file moved in by rename (fsynced): a
    crash leaves the old file or the new one, never a half-written tokenizer.json."""
    import os
    import shutil
    import tempfile

    from slm.utils.io import fsync_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out))
    try:
        tok.save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, out / f.name)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def corpus_texts(corpus, batch_documents: int = 1000) -> Iterator[list[str]]:
    """The text of a corpus (`CorpusConfig`) in batches of documents, read from its memory-mapped Arrow table
    (`slm.data.corpus.load_corpus`): only one batch is in Python memory at a time."""
    from slm.data.corpus import load_corpus

    ds = load_corpus(corpus).select_columns([corpus.text_field])
    for batch in ds.iter(batch_size=batch_documents):
        yield [t for t in batch[corpus.text_field] if t]


def train_corpus_tokenizer(corpora: list, vocab_size: int, out_dir: str | Path):
    """`train_bpe_tokenizer` on the documents of `corpora` (each a `CorpusConfig`), streamed one after another."""
    check_vocab_size(vocab_size)

    def batches():
        for corpus in corpora:
            yield from corpus_texts(corpus)

    return train_bpe_tokenizer(batches(), vocab_size, out_dir)
