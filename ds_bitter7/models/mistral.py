"""`bitter7_mistral`: Mistral whose blocks may each keep a different number of neurons and kv
groups, with its sliding attention window (`bitter7_llama` has none, so a Mistral model whose
window binds exports here). The blocks are Mistral's; only their widths change, as in
`bitter7_llama`.
"""

from __future__ import annotations

from typing import List, Optional

from huggingface_hub.dataclasses import strict
from transformers import MistralConfig, MistralForCausalLM

from .llama import resize_llama_layers, validate_widths


@strict
class Bitter7MistralConfig(MistralConfig):
    """Mistral config plus per-block widths and the compensation-bias flags Mistral lacks."""

    model_type = "bitter7_mistral"
    intermediate_sizes: Optional[List[int]] = None
    num_heads_per_layer: Optional[List[int]] = None
    num_kv_heads_per_layer: Optional[List[int]] = None
    placeholder_units: Optional[List[str]] = None  # blocks ("layers.1.attn") whose one unit is an all-zero
    # placeholder for units all pruned (a layer cannot be zero wide): pruned from the start when pruned again
    mlp_bias: bool = False  # biases on gate/up/down_proj (down_proj's holds the compensation)
    attention_bias: bool = False  # biases on q/k/v/o_proj (o_proj's holds the compensation)

    def validate_architecture(self):
        """Head counts need not divide hidden_size (head_dim is explicit); check the lists."""
        validate_widths(self)


class Bitter7MistralForCausalLM(MistralForCausalLM):
    """MistralForCausalLM with per-block MLP and attention widths from `Bitter7MistralConfig`."""

    config_class = Bitter7MistralConfig

    def __init__(self, config: Bitter7MistralConfig):
        super().__init__(config)
        resize_llama_layers(self.model.layers, config)
        self.post_init()
