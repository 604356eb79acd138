"""Tokenizers: load any `AutoTokenizer` directory, fingerprint it, train the demo's small BPE."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from slm.errors import SlmError, describe
from slm.io import sha256_dir

EOS = "<|endoftext|>"
PAD = "<|pad|>"


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
        raise SlmError(f"tokenizer {str(path)!r}: has no EOS token; packing needs one between documents")
    return tok


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 over the files that define the tokenizer (vocab, merges, config)."""
    return sha256_dir(path, ("tokenizer.json", "vocab.*", "merges.txt", "*.model", "special_tokens_map.json"))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Byte-level BPE with single-digit pre-splitting (numbers tokenise digit by digit)."""
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
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None)
    fast.model_max_length = 1 << 30
    fast.save_pretrained(str(out_dir))
    return fast
