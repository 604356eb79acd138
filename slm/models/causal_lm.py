"""What every slm backbone shares around its decoder: the LM head and generation with state.

A backbone defines its config, its `XPreTrainedModel(PreTrainedModel)` (weight init) and
its decoder `XModel`; its causal LM is then just

    class XForCausalLM(StreamingCausalLM, XPreTrainedModel):
        decoder_class = XModel

This mixin comes first among the bases so that its generation settings win over
GenerationMixin's. The recurrent state travels in and out through `past_key_values` (transformers >= 5.2x names the
output field `cache`; both argument names are accepted). Left-padded batches (generate, evaluation harnesses) run
row by row with a state per row (`RowStates`), so padding never enters a carried state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast


class StreamingCausalLM(GenerationMixin):
    """Decoder `self.model` + tied output projection `self.lm_head`; HF causal-LM interface."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    loss_type = "ForCausalLM"
    _is_stateful = True  # the state cannot be rewound: no assisted generation or beam reordering
    decoder_class: type

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must carry our own state, not a DynamicCache

    def __init__(self, config):
        super().__init__(config)
        self.model = self.decoder_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers saves, plus the backbone's code and an `auto_map` (slm.models.remote_code), so the
        export loads with `trust_remote_code=True` where slm is not installed. A model loaded that way saves
        as transformers saves remote-code models (it copies the files it was loaded from)."""
        try:
            from slm.models.remote_code import auto_map, write_remote_code
        except ImportError:  # this is the exported copy, running without slm
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.config.auto_map = auto_map(type(self))
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(type(self), save_directory)
        return out

    @classmethod
    def can_generate(cls) -> bool:  # transformers looks for GenerationMixin among the direct bases
        return True

    def get_decoder(self):
        return self.model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        past_key_values=None,
        use_cache=None,
        cache=None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        past = cache if cache is not None else past_key_values
        if isinstance(past, RowStates) or left_padded(attention_mask, input_ids.shape[1], self.config.model_type):
            logits, state = self._forward_rows(input_ids, attention_mask, past)
        else:
            out = self.model(input_ids, past_key_values=past, use_cache=use_cache)
            logits, state = self.lm_head(out.last_hidden_state), out.cache
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:  # HF convention: shift inside, -100 ignored, mean CE
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=state)

    def _forward_rows(self, input_ids, attention_mask, past: RowStates | None):
        """A left-padded batch, row by row: each row's real tokens run alone with its own carried state, so a pad
        token never enters a memory (M/z, CEMA and timestep-norm statistics, FAM, beacons) and each row's logits
        are those of the row without padding. Pad positions get zero logits."""
        B, T = input_ids.shape
        mask = (attention_mask[:, -T:] if attention_mask is not None else torch.ones_like(input_ids)).bool()
        states = list(past.rows) if past is not None else [None] * B
        logits = None
        for b in range(B):
            if not mask[b].any():  # a chunk of nothing but padding: the row's state is unchanged
                continue
            out = self.model(input_ids[b : b + 1, mask[b]], past_key_values=states[b], use_cache=True)
            row = self.lm_head(out.last_hidden_state)[0]
            if logits is None:
                logits = row.new_zeros(B, T, row.shape[-1])
            logits[b, mask[b]] = row
            states[b] = out.cache
        if logits is None:
            logits = self.lm_head.weight.new_zeros(B, T, self.config.vocab_size)
        return logits, RowStates(states, (past.length if past is not None else 0) + T)


@dataclass
class RowStates:
    """The carried state of a left-padded batch: one backbone state per row (None until its first real token)."""

    rows: list
    length: int  # columns seen, padding included (what generate counts)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def left_padded(attention_mask, chunk_len: int, model_type: str) -> bool:
    """True for a mask with left padding (zeros before the ones of each row); False for none. Right or inner
    padding is refused: it would put pad tokens between a row's real tokens and its continuation."""
    if attention_mask is None:
        return False
    mask = attention_mask.bool()
    if bool(mask.all()):
        return False
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):  # a 1 followed by a 0
        raise ValueError(
            f"{model_type.removeprefix('slm_')}: attention_mask pads on the right or inside a row; the "
            "streaming backbones take left padding (tokenizer.padding_side = 'left', as generate uses)"
        )
    return True
