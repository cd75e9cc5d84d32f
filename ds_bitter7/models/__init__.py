"""Model types for exported models whose blocks have different widths (`scope: global`).

Importing this package registers `bitter7_gpt2`, `bitter7_llama` and `bitter7_mistral` with transformers' Auto
classes, so `AutoModelForCausalLM.from_pretrained(exported_dir)` works after `import ds_bitter7`.
Registering at import is the one documented exception to "no side effects at import".
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .gpt2 import Bitter7GPT2Config, Bitter7GPT2LMHeadModel
from .llama import Bitter7LlamaConfig, Bitter7LlamaForCausalLM
from .mistral import Bitter7MistralConfig, Bitter7MistralForCausalLM

__all__ = [
    "Bitter7GPT2Config",
    "Bitter7GPT2LMHeadModel",
    "Bitter7LlamaConfig",
    "Bitter7LlamaForCausalLM",
    "Bitter7MistralConfig",
    "Bitter7MistralForCausalLM",
]

for _config, _model in ((Bitter7GPT2Config, Bitter7GPT2LMHeadModel), (Bitter7LlamaConfig, Bitter7LlamaForCausalLM),
                       (Bitter7MistralConfig, Bitter7MistralForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
