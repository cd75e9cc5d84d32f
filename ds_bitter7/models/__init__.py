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


# model_type -> (module file, config class, model class); the exporter copies the module (and what it
# imports) beside the weights, so that `trust_remote_code=True` loads the model without ds_bitter7.
_REMOTE = {"bitter7_gpt2": ("gpt2", "Bitter7GPT2Config", "Bitter7GPT2LMHeadModel"),
           "bitter7_llama": ("llama", "Bitter7LlamaConfig", "Bitter7LlamaForCausalLM"),
           "bitter7_mistral": ("mistral", "Bitter7MistralConfig", "Bitter7MistralForCausalLM")}
_IMPORTS = {"gpt2": ["widths"], "llama": ["widths"], "mistral": ["llama", "widths"]}


def remote_code(model_type: str):
    """(files {name: source}, auto_map) for an exported ``model_type``, or ({}, {}) for a standard one."""
    import os

    if model_type not in _REMOTE:
        return {}, {}
    module, config_cls, model_cls = _REMOTE[model_type]
    here = os.path.dirname(os.path.abspath(__file__))
    files = {}
    for name in [module] + _IMPORTS.get(module, []):
        with open(os.path.join(here, f"{name}.py"), encoding="utf-8") as f:
            source = f.read()
        for dep in _IMPORTS.get(name, []):
            source = source.replace(f"from .{dep} import", f"from .modeling_bitter7_{dep} import")
        files[f"modeling_bitter7_{name}.py"] = source
    prefix = f"modeling_bitter7_{module}"
    return files, {"AutoConfig": f"{prefix}.{config_cls}", "AutoModelForCausalLM": f"{prefix}.{model_cls}"}
