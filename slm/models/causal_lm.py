"""What every slm backbone shares around its decoder: the LM head and generation with state.

A backbone defines its config, its `XPreTrainedModel(PreTrainedModel)` (weight init) and
its decoder `XModel`; its causal LM is then just

    class XForCausalLM(StreamingCausalLM, XPreTrainedModel):
        decoder_class = XModel

This mixin comes first among the bases so that its generation settings win over
GenerationMixin's. The recurrent state travels in and out through `past_key_values` (transformers >= 5.2x names the
output field `cache`; both argument names are accepted).
"""

from __future__ import annotations

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

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, use_cache=None,
                cache=None, logits_to_keep: int = 0, **kwargs):
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                         use_cache=use_cache, cache=cache)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:  # HF convention: shift inside, -100 ignored, mean CE
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)
