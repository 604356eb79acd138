"""A hand-built copying model (an explicit induction head, Olsson et al. 2022) as a real Hugging Face causal LM,
used only to check that the RULER evaluator measures retrieval: it finds the most recent earlier place where the
last n tokens (n = max_match down to 1) occurred and predicts the token that followed them there.

Its state is the token ids seen so far, carried through `past_key_values` like an slm backbone's state, so the
evaluator streams prompts into it in chunks exactly as it streams them into a real model. `copy=False` turns the
rule off (it then always predicts token 0): the negative control.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class InductionConfig(PretrainedConfig):
    model_type = "slm_test_induction"
    vocab_size: int = 64
    max_match: int = 8
    copy: bool = True


@dataclass
class SeenTokens:
    ids: list[int]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return len(self.ids)


class InductionForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = InductionConfig
    _is_stateful = True

    def __init__(self, config: InductionConfig):
        super().__init__(config)
        self.unused = nn.Parameter(torch.zeros(1))  # so that save/load has a weight
        self.post_init()

    def _init_weights(self, module):
        pass

    def next_token(self, seen: list[int]) -> int:
        """The token after the most recent earlier occurrence of the longest matching suffix of `seen`."""
        if self.config.copy:
            for n in range(min(self.config.max_match, len(seen) - 1), 0, -1):
                suffix = seen[-n:]
                for j in range(len(seen) - n - 1, -1, -1):  # occurrence seen[j : j + n], followed by seen[j + n]
                    if seen[j : j + n] == suffix:
                        return seen[j + n]
        return 0

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep: int = 0, **kwargs):
        before = list(past_key_values.ids) if past_key_values is not None else []
        new = input_ids[0].tolist()
        seen = before + new
        T = len(new)
        keep = range(T - logits_to_keep, T) if logits_to_keep else range(T)  # the evaluator keeps the last one
        logits = torch.full((1, len(keep), self.config.vocab_size), -30.0)
        for i, t in enumerate(keep):
            logits[0, i, self.next_token(seen[: len(before) + t + 1])] = 30.0
        return CausalLMOutputWithPast(logits=logits, past_key_values=SeenTokens(seen))


AutoConfig.register(InductionConfig.model_type, InductionConfig, exist_ok=True)
AutoModelForCausalLM.register(InductionConfig, InductionForCausalLM, exist_ok=True)
