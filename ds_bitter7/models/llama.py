"""`bitter7_llama`: LLaMA whose blocks may each keep a different number of neurons and kv groups.

Removing a key/value group removes its query heads too, so the query heads per group
(`num_key_value_groups`) stay as in the base model; only the number of groups per block changes.
`head_dim` is always explicit because `hidden_size / num_attention_heads` no longer gives it.
"""

from __future__ import annotations

from typing import List, Optional

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .widths import validate_placeholders


@strict
class Bitter7LlamaConfig(LlamaConfig):
    """LLaMA config plus per-block widths (None: the block keeps the base config's width)."""

    model_type = "bitter7_llama"
    intermediate_sizes: Optional[List[int]] = None
    num_heads_per_layer: Optional[List[int]] = None
    num_kv_heads_per_layer: Optional[List[int]] = None
    placeholder_units: Optional[List[str]] = None  # blocks ("layers.1.attn") whose one unit is an all-zero
    # placeholder for units all pruned (a layer cannot be zero wide): pruned from the start when pruned again

    def validate_architecture(self):
        """Head counts need not divide hidden_size (head_dim is explicit); check the lists."""
        validate_widths(self)


def validate_widths(config) -> None:
    """The per-block lists of a bitter7 LLaMA-family config have one entry per block."""
    for name in ("intermediate_sizes", "num_heads_per_layer", "num_kv_heads_per_layer"):
        sizes = getattr(config, name)
        if sizes is not None and len(sizes) != config.num_hidden_layers:
            raise ValueError(f"{name} has {len(sizes)} entries; expected num_hidden_layers={config.num_hidden_layers}")
    if (config.num_heads_per_layer is None) != (config.num_kv_heads_per_layer is None):
        raise ValueError("num_heads_per_layer and num_kv_heads_per_layer must be given together")
    validate_placeholders(config.placeholder_units, config.num_hidden_layers,
                          {"mlp": config.intermediate_sizes, "attn": config.num_kv_heads_per_layer})


def resize_llama_layers(layers, config) -> None:
    """Replace each decoder layer's MLP and attention projections with the per-block widths
    (LLaMA and Mistral blocks name them alike)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    for i, layer in enumerate(layers):
        if config.intermediate_sizes is not None:
            mlp, inter = layer.mlp, config.intermediate_sizes[i]
            mlp.intermediate_size = inter
            mlp.gate_proj = nn.Linear(hidden, inter, bias=config.mlp_bias)
            mlp.up_proj = nn.Linear(hidden, inter, bias=config.mlp_bias)
            mlp.down_proj = nn.Linear(inter, hidden, bias=config.mlp_bias)
        if config.num_heads_per_layer is not None:
            attn = layer.self_attn
            n_q, n_kv = config.num_heads_per_layer[i], config.num_kv_heads_per_layer[i]
            # LlamaAttention.forward infers the head count from the projection width; the
            # attention functions read num_key_value_groups for GQA.
            attn.num_key_value_groups = n_q // n_kv
            bias = config.attention_bias
            attn.q_proj = nn.Linear(hidden, n_q * head_dim, bias=bias)
            attn.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=bias)
            attn.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=bias)
            attn.o_proj = nn.Linear(n_q * head_dim, hidden, bias=bias)


class Bitter7LlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with per-block MLP and attention widths from `Bitter7LlamaConfig`."""

    config_class = Bitter7LlamaConfig

    def __init__(self, config: Bitter7LlamaConfig):
        super().__init__(config)
        resize_llama_layers(self.model.layers, config)
        self.post_init()
