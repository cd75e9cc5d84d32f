"""Physically remove pruned MLP neurons and attention heads from a Hugging Face causal LM.

Pure torch on a state dict: each unit's weights are picked out with `index_select` along the
dimension the unit owns (the units of ``structures``' adapters, written here per weight layout,
GPT-2's or LLaMA's), the next layer's bias (which holds the bias compensation) is kept as is, and a
model of the new shape is built from a config that says the new widths: a standard config where
one is able to (same width in every block), else the `bitter7_gpt2` / `bitter7_llama` /
`bitter7_mistral` types of `ds_bitter7.models`. Building that model needs the architecture, not
only its units: a model type made prunable with ``register_adapter`` is not exported smaller
(``family_of`` names the types that are).

A block whose every unit of a kind was pruned keeps one (all-zero) unit, because transformers'
layers cannot be zero wide; a pruned unit contributes exactly nothing, so the output is unchanged.
The config names these blocks (``placeholder_units``): pruned again, their unit is pruned from the
start and counts for no fraction.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .models import Bitter7GPT2Config, Bitter7LlamaConfig, Bitter7MistralConfig

logger = logging.getLogger(__name__)

Masks = Mapping[str, torch.Tensor]
# (unit indices kept, geometry) -> element indices along the parameter's dimension
IndexFn = Callable[[torch.Tensor, "_Geometry"], torch.Tensor]


@dataclass(frozen=True)
class _Geometry:
    """Sizes of one block, read from its weights: what the index functions need."""

    n_units: int  # units of this kind in the block now
    head_dim: int = 1
    q_per_unit: int = 1  # query heads per attention unit (GQA group size; 1 for GPT-2)


def _rows(per: int) -> IndexFn:
    """Unit u owns elements [u*per, (u+1)*per) (per = 1 for a neuron, head_dim for a head)."""

    def index(kept: torch.Tensor, geo: _Geometry) -> torch.Tensor:
        size = per if per > 0 else geo.head_dim * geo.q_per_unit
        return (kept[:, None] * size + torch.arange(size)).reshape(-1)

    return index


def _kv_rows(kept: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """One head (GPT-2) or one key/value head (LLaMA) per unit: head_dim elements each."""
    return (kept[:, None] * geo.head_dim + torch.arange(geo.head_dim)).reshape(-1)


def _fused_qkv(kept: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    # GPT-2's c_attn fuses [q | k | v] along its output dim, each n_heads*head_dim wide: a head
    # owns the same columns within each of the three parts.
    cols = _kv_rows(kept, geo)
    width = geo.n_units * geo.head_dim
    return torch.cat([cols + part * width for part in range(3)])


_neuron = _rows(1)
_query_rows = _rows(0)  # 0: the width of every query head of the unit (head_dim * q_per_unit)

# Per family and kind: (parameter suffix inside the block, dim, index function). GPT-2's Conv1D
# stores weights as [in, out], so its "output rows" are dim 1; nn.Linear stores [out, in].
_LAYOUTS: Dict[str, Dict[str, Sequence[Tuple[str, int, IndexFn]]]] = {
    "gpt2": {
        "mlp": (("mlp.c_fc.weight", 1, _neuron), ("mlp.c_fc.bias", 0, _neuron), ("mlp.c_proj.weight", 0, _neuron)),
        "attn": (
            ("attn.c_attn.weight", 1, _fused_qkv),
            ("attn.c_attn.bias", 0, _fused_qkv),
            ("attn.c_proj.weight", 0, _kv_rows),
        ),
    },
    "llama": {
        "mlp": (
            ("mlp.gate_proj.weight", 0, _neuron),
            ("mlp.gate_proj.bias", 0, _neuron),
            ("mlp.up_proj.weight", 0, _neuron),
            ("mlp.up_proj.bias", 0, _neuron),
            ("mlp.down_proj.weight", 1, _neuron),
        ),
        "attn": (
            ("self_attn.q_proj.weight", 0, _query_rows),
            ("self_attn.q_proj.bias", 0, _query_rows),
            ("self_attn.k_proj.weight", 0, _kv_rows),
            ("self_attn.k_proj.bias", 0, _kv_rows),
            ("self_attn.v_proj.weight", 0, _kv_rows),
            ("self_attn.v_proj.bias", 0, _kv_rows),
            ("self_attn.o_proj.weight", 1, _query_rows),
        ),
    },
}
# Parameters whose first entry's size gives the block's unit count, per family and kind.
_SIZE_PARAM = {
    "gpt2": {"mlp": ("mlp.c_fc.bias", 0), "attn": ("attn.c_proj.weight", 0)},
    "llama": {"mlp": ("mlp.gate_proj.weight", 0), "attn": ("self_attn.k_proj.weight", 0)},
}
_FAMILY = {
    "gpt2": "gpt2",
    "bitter7_gpt2": "gpt2",
    "llama": "llama",
    "bitter7_llama": "llama",
    "mistral": "llama",
    "bitter7_mistral": "llama",
    "qwen2": "llama",
}
_BLOCK_PREFIX = {"gpt2": "transformer.h.{i}.", "llama": "model.layers.{i}."}
_KINDS = ("mlp", "attn")


def family_of(config) -> str:
    """`gpt2` or `llama` (the weight layout) for a config's model_type; raises if unsupported."""
    family = _FAMILY.get(config.model_type)
    if family is None:
        raise ValueError(
            f"model_type {config.model_type!r} is not supported for shrinking; supported: {sorted(_FAMILY)}"
        )
    return family


def _head_geometry(config, family: str) -> Tuple[int, int]:
    """(head_dim, query heads per attention unit) from the config, never hard-coded."""
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if family == "gpt2":
        return config.hidden_size // n_heads, 1
    return head_dim, n_heads // (getattr(config, "num_key_value_heads", None) or n_heads)


def unit_counts(state_dict: Mapping[str, torch.Tensor], config) -> Dict[str, int]:
    """Units per block and kind, read from the weights (so re-shrinking a shrunk model works)."""
    family = family_of(config)
    head_dim, _ = _head_geometry(config, family)
    counts = {}
    for i in range(config.num_hidden_layers):
        prefix = _BLOCK_PREFIX[family].format(i=i)
        for kind in _KINDS:
            name, dim = _SIZE_PARAM[family][kind]
            size = state_dict[prefix + name].shape[dim]
            counts[f"layers.{i}.{kind}"] = size if kind == "mlp" else size // head_dim
    return counts


def validate_masks(masks: Masks, counts: Mapping[str, int], source: str = "masks") -> None:
    """Raise one ValueError listing every mask key that is unknown or of the wrong length/dtype.

    A block or kind missing from `masks` is kept whole (e.g. only `mlp_neuron` was pruned).
    """
    problems = []
    for key, mask in masks.items():
        if key not in counts:
            problems.append(f"unknown key {key!r}")
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            problems.append(f"{key!r} must be a 1-D bool tensor, got {getattr(mask, 'dtype', type(mask))}")
        elif mask.numel() != counts[key]:
            problems.append(f"{key!r} has {mask.numel()} units; the model has {counts[key]}")
    if problems:
        expected = f"expected keys like 'layers.0.mlp' with the model's unit counts ({len(counts)} keys)"
        raise ValueError(f"{source} do not match the model: " + "; ".join(problems) + f" ({expected})")


def _geometry(config, family: str, kind: str, n_units: int) -> _Geometry:
    if kind == "mlp":
        return _Geometry(n_units)
    head_dim, q_per_unit = _head_geometry(config, family)
    return _Geometry(n_units, head_dim, q_per_unit)


def _kept_indices(mask: torch.Tensor) -> torch.Tensor:
    kept = mask.nonzero().reshape(-1)
    # All pruned: keep unit 0, whose weights are zero, so the layer stays at least one unit wide.
    return kept if kept.numel() else torch.zeros(1, dtype=torch.long)


@torch.no_grad()
def zero_pruned_units_(model: nn.Module, masks: Masks) -> None:
    """Set every element of each pruned unit to exactly zero, in place (next-layer biases untouched)."""
    family = family_of(model.config)
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        i, kind = _split_key(key)
        prefix = _BLOCK_PREFIX[family].format(i=i)
        pruned = (~mask.cpu()).nonzero().reshape(-1)
        if not pruned.numel():
            continue
        geo = _geometry(model.config, family, kind, mask.numel())
        for suffix, dim, index in _LAYOUTS[family][kind]:
            param = params.get(prefix + suffix)
            if param is not None:
                param.index_fill_(dim, index(pruned, geo).to(param.device), 0.0)


def _split_key(key: str) -> Tuple[int, str]:
    match = re.fullmatch(r"layers\.(\d+)\.(mlp|attn)", key)
    if match is None:
        raise ValueError(f"mask key {key!r} is not of the form 'layers.<i>.mlp' or 'layers.<i>.attn'")
    return int(match.group(1)), match.group(2)


def shrink_state_dict(
    state_dict: Mapping[str, torch.Tensor], config, masks: Masks
) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Index-select the kept units' weights; returns (new state dict, new unit counts)."""
    family = family_of(config)
    counts = unit_counts(state_dict, config)
    validate_masks(masks, counts)
    out = dict(state_dict)
    new_counts = dict(counts)
    for key, mask in masks.items():
        i, kind = _split_key(key)
        prefix = _BLOCK_PREFIX[family].format(i=i)
        kept = _kept_indices(mask.cpu())
        new_counts[key] = kept.numel()
        geo = _geometry(config, family, kind, counts[key])
        for suffix, dim, index in _LAYOUTS[family][kind]:
            name = prefix + suffix
            if name in out:
                out[name] = out[name].index_select(dim, index(kept, geo).to(out[name].device)).contiguous()
    return out, new_counts


def _uniform(values: List[int]) -> bool:
    return len(set(values)) == 1


def _add_zero_biases(state_dict: Dict[str, torch.Tensor], config, family: str) -> Dict[str, bool]:
    """LLaMA-layout models may carry a compensation bias on down_proj / o_proj that the config
    has no flag for. LlamaConfig can only say "all MLP (or all attention) projections have a
    bias", so give the others zero biases: the output is unchanged. Returns the flags to set."""
    if family != "llama":
        return {}
    groups = {"mlp_bias": ("mlp.", ("gate_proj", "up_proj", "down_proj")),
              "attention_bias": ("self_attn.", ("q_proj", "k_proj", "v_proj", "o_proj"))}
    flags = {}
    for flag, (module, projs) in groups.items():
        prefixes = [_BLOCK_PREFIX[family].format(i=i) + module for i in range(config.num_hidden_layers)]
        if not any(p + proj + ".bias" in state_dict for p in prefixes for proj in projs):
            continue
        flags[flag] = True
        for p in prefixes:
            for proj in projs:
                weight = state_dict[p + proj + ".weight"]
                state_dict.setdefault(p + proj + ".bias", weight.new_zeros(weight.shape[0]))
    return flags


def _config_dict(config) -> dict:
    data = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        data.pop(key, None)
    return data


def placeholders_after(config, masks: Masks) -> List[str]:
    """The blocks whose one unit will be an all-zero placeholder once ``masks`` shrink a model of
    ``config``: those the masks prune whole, and the config's own that the masks leave alone."""
    whole = {k for k, m in masks.items() if not bool(m.any())}
    whole |= {k for k in getattr(config, "placeholder_units", None) or [] if k not in masks}
    return sorted(whole, key=_split_key)


def build_config(config, counts: Mapping[str, int], extra_flags: Optional[Dict[str, bool]] = None,
                 standard: bool = True, placeholders: Sequence[str] = ()):
    """The config of the shrunk model: standard when every block has the same widths (and the
    standard class can say so; ``standard=False`` skips it) and none holds a placeholder unit
    (``placeholders``, see ``placeholders_after``), else `bitter7_gpt2` / `bitter7_llama`
    (`bitter7_mistral` for a Mistral model whose sliding window binds)."""
    family = family_of(config)
    n = config.num_hidden_layers
    mlp = [counts[f"layers.{i}.mlp"] for i in range(n)]
    attn = [counts[f"layers.{i}.attn"] for i in range(n)]
    data = {**_config_dict(config), **(extra_flags or {})}
    for key in ("intermediate_sizes", "num_heads_per_layer", "num_kv_heads_per_layer", "placeholder_units"):
        data.pop(key, None)
    if placeholders:
        data["placeholder_units"] = list(placeholders)
    head_dim, q_per_unit = _head_geometry(config, family)
    if family == "gpt2":
        if _uniform(mlp) and attn == [config.n_head] * n and config.model_type == "gpt2" and not placeholders:
            return type(config)(**{**data, "n_inner": mlp[0]})
        return Bitter7GPT2Config(**data, intermediate_sizes=mlp, num_heads_per_layer=attn)
    why = "its blocks have different widths (prune with scope: per_layer for a standard model)"
    if not standard:
        why = f"it carries compensation biases the standard {config.model_type} class cannot hold"
    elif placeholders:
        why = "its config names the all-zero units that stand for layers pruned whole"
    elif _uniform(mlp) and _uniform(attn) and not config.model_type.startswith("bitter7_"):
        uniform = {"intermediate_size": mlp[0], "num_attention_heads": attn[0] * q_per_unit,
                   "num_key_value_heads": attn[0], "head_dim": head_dim}
        try:
            return type(config)(**{**data, **uniform})
        except Exception as err:  # ValueError, or huggingface_hub's strict-dataclass validation error
            why = f"the standard {config.model_type} config refuses the shape ({err})"
            logger.info("standard %s config cannot express the shape (%s); using bitter7_llama", config.model_type, err)
    window = binding_sliding_window(config)
    widths = {"intermediate_sizes": mlp, "num_heads_per_layer": [a * q_per_unit for a in attn],
              "num_kv_heads_per_layer": attn, "head_dim": head_dim}
    if window is not None and config.model_type in ("mistral", "bitter7_mistral"):
        return Bitter7MistralConfig(**{**data, **widths})  # Mistral's own blocks keep the window
    if window is not None:
        raise NotImplementedError(
            f"{config.model_type} with a sliding attention window ({window} tokens, under its "
            f"{config.max_position_embeddings} positions) cannot be exported: {why}, so it needs "
            "bitter7_llama, which has no sliding window"
        )
    for key in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"):
        data.pop(key, None)  # Mistral / Qwen2 keys: no window binds, so the LLaMA blocks compute the same
    return Bitter7LlamaConfig(**{**data, **widths})


def window_export_problem(config, structures: Sequence[str], scope: str, compensation: bool) -> Optional[str]:
    """Why a model whose ``structures`` are pruned with ``scope`` (and compensation biases, with
    ``compensation``) cannot be exported smaller: a Qwen2 model whose sliding window binds exports
    only as a standard ``qwen2`` (``build_config``: the same widths in every block, no biases its
    class cannot hold); else None. Unstructured pruning changes no width."""
    window = binding_sliding_window(config) if getattr(config, "model_type", None) == "qwen2" else None
    why = [w for w, bad in ((f"scope {scope}", scope != "per_layer"), ("bias compensation", compensation)) if bad]
    if window is None or not why or not set(structures) & {"mlp_neuron", "attention_head"}:
        return None
    return (f"this qwen2 model's sliding window ({window} tokens) binds: with {' and '.join(why)} its pruned "
            "model cannot be exported smaller (only a standard qwen2 keeps the window: scope per_layer, "
            "no bias compensation)")


def binding_sliding_window(config) -> Optional[int]:
    """The attention window of a Mistral / Qwen2 config when it can change the output, else None."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2":  # its blocks slide where layer_types says so (from max_window_layers)
        layer_types = getattr(config, "layer_types", None)
        sliding = "sliding_attention" in layer_types if layer_types else getattr(config, "use_sliding_window", False)
        window = window if sliding else None
    if window is None or window >= config.max_position_embeddings:
        return None
    return window


def _param_counts(state_dict: Mapping[str, torch.Tensor], prefix: str, kind: str) -> int:
    module = {"mlp": "mlp.", "attn": ("attn.", "self_attn.")}[kind]
    modules = (module,) if isinstance(module, str) else module
    return sum(t.numel() for k, t in state_dict.items() if any(k.startswith(prefix + m) for m in modules))


def layer_report(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], config,
                 masks: Masks, counts: Mapping[str, int]) -> List[dict]:
    """Per block and kind: units kept / total and the block's parameters before / after."""
    family = family_of(config)
    rows = []
    for i in range(config.num_hidden_layers):
        prefix = _BLOCK_PREFIX[family].format(i=i)
        for kind in _KINDS:
            key = f"layers.{i}.{kind}"
            total = counts[key]
            kept = int(masks[key].sum()) if key in masks else total
            rows.append({
                "layer": i, "kind": kind, "units_kept": kept, "units_total": total,
                "units_in_model": max(kept, min(total, 1)),  # a layer cannot be zero wide (module docstring)
                "params_before": _param_counts(before, prefix, kind),
                "params_after": _param_counts(after, prefix, kind),
            })
    return rows


def shrink_model(model: PreTrainedModel, masks: Masks) -> Tuple[PreTrainedModel, List[dict]]:
    """A new, physically smaller model with the pruned units removed, and the per-layer report.

    `model` must already have its pruned units at zero (the pruner guarantees it; see
    `zero_pruned_units_`); compensated next-layer biases are carried over unchanged.
    """
    config = model.config
    family = family_of(config)
    before = model.state_dict()
    counts = unit_counts(before, config)
    after, new_counts = shrink_state_dict(before, config, masks)
    placeholders = placeholders_after(config, masks)
    new_config = build_config(config, new_counts, placeholders=placeholders)
    if _misfit(new_config, after):  # compensation biases the config has no flag for
        flags = _add_zero_biases(after, config, family)
        new_config = build_config(config, new_counts, flags, placeholders=placeholders)
        if _misfit(new_config, after):  # a standard Mistral / Qwen2 cannot say "bias on o_proj"
            new_config = build_config(config, new_counts, flags, standard=False, placeholders=placeholders)
    dtype = next(model.parameters()).dtype
    small = AutoModelForCausalLM.from_config(new_config, dtype=dtype)
    missing, unexpected = key_mismatch(small, after)
    if missing or unexpected:
        raise RuntimeError(f"shrunk weights do not fit the new model: missing {missing}, unexpected {unexpected}")
    small.load_state_dict(after, strict=False)
    small.tie_weights()
    if getattr(model, "generation_config", None) is not None:  # stop tokens, sampling defaults: not in config.json
        small.generation_config = copy.deepcopy(model.generation_config)
    small.eval()
    return small, layer_report(before, after, config, masks, counts)


def key_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """(missing, unexpected) parameter names of ``state_dict`` for ``model`` (tied weights may be missing)."""
    have = set(model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return sorted(have - set(state_dict) - tied), sorted(set(state_dict) - have)


def _misfit(config, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a model of ``config`` lacks or has extra parameters for ``state_dict`` (built on meta)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return any(key_mismatch(model, state_dict))
