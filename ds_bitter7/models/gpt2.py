"""`bitter7_gpt2`: GPT-2 whose blocks may each keep a different number of MLP neurons and heads.

A standard `GPT2Config` cannot express either: `n_inner` is one number for all blocks, and the
attention width is tied to `n_embd` (`n_embd == n_head * head_dim`). Here `head_dim` stays
`n_embd // n_head` of the original model and block i has `num_heads_per_layer[i]` heads, so its
attention is `num_heads_per_layer[i] * head_dim` wide while the residual stream keeps `n_embd`.
"""

from __future__ import annotations

from typing import List, Optional

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, Conv1D

from .widths import validate_placeholders


@strict
class Bitter7GPT2Config(GPT2Config):
    """GPT-2 config plus per-block widths (None: the block keeps the base config's width)."""

    model_type = "bitter7_gpt2"
    intermediate_sizes: Optional[List[int]] = None
    num_heads_per_layer: Optional[List[int]] = None
    placeholder_units: Optional[List[str]] = None  # blocks ("layers.1.attn") whose one unit is an all-zero
    # placeholder for units all pruned (a layer cannot be zero wide): pruned from the start when pruned again

    def validate_architecture(self):
        """Per-block head counts need not divide n_embd; check the list lengths instead."""
        super().validate_architecture()
        for name in ("intermediate_sizes", "num_heads_per_layer"):
            sizes = getattr(self, name)
            if sizes is not None and len(sizes) != self.n_layer:
                raise ValueError(f"{name} has {len(sizes)} entries; expected n_layer={self.n_layer}")
        validate_placeholders(self.placeholder_units, self.n_layer,
                              {"mlp": self.intermediate_sizes, "attn": self.num_heads_per_layer})


def resize_gpt2_blocks(blocks, config: Bitter7GPT2Config) -> None:
    """Replace each block's MLP and attention projections with the per-block widths."""
    head_dim = config.n_embd // config.n_head
    for i, block in enumerate(blocks):
        if config.intermediate_sizes is not None:
            block.mlp = GPT2MLP(config.intermediate_sizes[i], config)
        if config.num_heads_per_layer is not None:
            attn = block.attn
            n_heads = config.num_heads_per_layer[i]
            width = n_heads * head_dim
            # GPT2Attention.forward reads num_heads, head_dim and split_size (the q|k|v split).
            attn.num_heads, attn.split_size = n_heads, width
            attn.c_attn = Conv1D(3 * width, config.n_embd)
            attn.c_proj = Conv1D(config.n_embd, width)


class Bitter7GPT2LMHeadModel(GPT2LMHeadModel):
    """GPT2LMHeadModel with per-block MLP and attention widths from `Bitter7GPT2Config`."""

    config_class = Bitter7GPT2Config

    def __init__(self, config: Bitter7GPT2Config):
        super().__init__(config)
        resize_gpt2_blocks(self.transformer.h, config)
        self.post_init()
