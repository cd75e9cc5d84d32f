"""Tiny models, known optimizer state, and single-process reference answers in plain torch.

The reference unit definitions are written out here from the README's element lists (The method), independently of
``ds_bitter7.structures``, so the tests compare two separate readings of the contract.
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, List, Tuple

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 64


# (units, units each block keeps) per kind: the tiny models exported after a global event
EXPORTED = {"bitter7_gpt2": {"mlp": (96, [60, 84]), "attn": (4, [3, 2])},
            "bitter7_llama": {"mlp": (80, [50, 70]), "attn": (2, [1, 2])}}


def kept_elements(s, unit_keep: torch.Tensor, start: int = 0, numel: int = -1) -> torch.Tensor:
    """BoolTensor over the flat range ``[start, start + numel)`` of a ``ParamSlice`` (all of it by
    default): whether each element survives ``unit_keep`` (elements of no unit always do)."""
    ids = s.unit_ids.view([-1 if d == s.dim else 1 for d in range(len(s.shape))]).expand(s.shape)
    full = torch.where(ids >= 0, unit_keep[ids.clamp_min(0)], torch.ones_like(ids, dtype=torch.bool)).flatten()
    return full[start:] if numel < 0 else full[start:start + numel]


def tiny_model(family: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A GPT-2 (Conv1D, fused qkv) or LLaMA with grouped-query attention, ``layers`` blocks, fp32,
    no dropout. ``bitter7_gpt2`` / ``bitter7_llama``: that model (2 blocks) shrunk as an export after
    a global event would, each block keeping the ``EXPORTED`` number of neurons and heads."""
    if family in EXPORTED:
        from ds_bitter7.shrink import shrink_model

        masks = {f"layers.{i}.{kind}": torch.arange(n).mul(7).remainder(n) < kept[i]  # scattered units
                 for kind, (n, kept) in EXPORTED[family].items() for i in range(2)}
        return shrink_model(tiny_model(family[len("bitter7_"):], seed), masks)[0]
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=48, n_head=4, n_inner=96, vocab_size=VOCAB, n_positions=32,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def small_model(family: str, mlp_bias: bool = False, seed: int = 0) -> torch.nn.Module:
    """Tiny fp32 models with initializer_range 0.1, so weight magnitudes dwarf a shrunken unit."""
    torch.manual_seed(seed)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=VOCAB,
                                          n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          initializer_range=0.1, bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=32, initializer_range=0.1, mlp_bias=mlp_bias,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def ds_config(stage: int, dtype: str, bitter7: dict, **extra) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
           "bitter7": bitter7, "steps_per_print": 10**9}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":  # a small initial loss scale: no overflow-skipped first step
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 4}
    if dtype == "bf16_optimizer":  # bf16 with fp32 gradient accumulation: DeepSpeed's BF16_Optimizer
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    cfg.update(extra)
    return cfg


def known(name: str, shape, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deterministic full (weight, exp_avg_sq) for a parameter, independent of world size."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
    w = torch.randn(shape, generator=g)
    v = torch.rand(shape, generator=g).pow(4) * 1e-3
    return w, v


def element_score(score: str, w: torch.Tensor, v: torch.Tensor, eps=1e-8, exponent=0.25) -> torch.Tensor:
    w, v = w.double(), v.double()
    if score == "magnitude":
        return w.abs()
    if score == "fisher":
        return w.square() * v
    return w.abs() * (v + eps) ** exponent


def _unit_elements(family: str, model, layer: int, kind: str) -> List[Dict[str, tuple]]:
    """For each unit, {param name: index expression} of its elements, straight from the README's element lists.
    Each block's widths come from its weights (an exported ``bitter7_*`` model's differ by block)."""
    units = []

    def width(name: str, dim: int) -> int:
        return model.get_parameter(name).shape[dim]

    if family.removeprefix("bitter7_") == "gpt2":
        p = f"transformer.h.{layer}"
        if kind == "mlp":
            for i in range(width(f"{p}.mlp.c_fc.weight", 1)):
                units.append({f"{p}.mlp.c_fc.weight": (slice(None), i), f"{p}.mlp.c_fc.bias": (i,),
                              f"{p}.mlp.c_proj.weight": (i, slice(None))})
        else:
            hd = model.config.n_embd // model.config.n_head
            e = width(f"{p}.attn.c_proj.weight", 0)  # this block's q (and k, v) width
            for j in range(e // hd):
                cols = torch.cat([torch.arange(j * hd, (j + 1) * hd) + o for o in (0, e, 2 * e)])
                units.append({f"{p}.attn.c_attn.weight": (slice(None), cols), f"{p}.attn.c_attn.bias": (cols,),
                              f"{p}.attn.c_proj.weight": (slice(j * hd, (j + 1) * hd), slice(None))})
        return units
    p = f"model.layers.{layer}"
    c = model.config
    if kind == "mlp":
        for i in range(width(f"{p}.mlp.gate_proj.weight", 0)):
            units.append({f"{p}.mlp.gate_proj.weight": (i, slice(None)), f"{p}.mlp.up_proj.weight": (i, slice(None)),
                          f"{p}.mlp.down_proj.weight": (slice(None), i)})
        return units
    hd = c.hidden_size // c.num_attention_heads
    per = c.num_attention_heads // c.num_key_value_heads
    for g in range(width(f"{p}.self_attn.k_proj.weight", 0) // hd):
        q = slice(g * per * hd, (g + 1) * per * hd)
        kv = slice(g * hd, (g + 1) * hd)
        units.append({f"{p}.self_attn.q_proj.weight": (q, slice(None)), f"{p}.self_attn.k_proj.weight": (kv, slice(None)),
                      f"{p}.self_attn.v_proj.weight": (kv, slice(None)), f"{p}.self_attn.o_proj.weight": (slice(None), q)})
    return units


def reference_unit_scores(family: str, model, kinds: List[str], score: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Unit scores from full known tensors: {"layers.i.mlp": float64[n], ...}."""
    params = dict(model.named_parameters())
    full = {n: known(n, p.shape, seed) for n, p in params.items()}
    out = {}
    n_layers = model.config.num_hidden_layers
    for i in range(n_layers):
        for kind in kinds:
            units = _unit_elements(family, model, i, kind)
            s = torch.zeros(len(units), dtype=torch.float64)
            for u, elems in enumerate(units):
                for name, idx in elems.items():
                    w, v = full[name]
                    s[u] += element_score(score, w[idx], v[idx]).sum()
            out[f"layers.{i}.{kind}"] = s
    return out


def standardized(scores: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each layer's unit scores z-scored on their own (nothing pruned yet): FLAP's per-layer scaling."""
    return {k: (s - s.mean()) / s.std() for k, s in scores.items()}


def reference_masks(scores: Dict[str, torch.Tensor], fraction: float, scope: str = "global") -> Dict[str, torch.Tensor]:
    """Exact selection: floor(fraction * n) lowest, ties to the lower (layer, unit) index.

    ``scope``: global, per_layer, or standardized (global over per-layer z-scores).
    """
    if scope == "standardized":
        scores = standardized(scores)
    out = {}
    for kind in ("mlp", "attn"):
        keys = [k for k in scores if k.endswith(kind)]
        if not keys:
            continue
        buckets = [[k] for k in keys] if scope == "per_layer" else [keys]
        for bucket in buckets:
            flat = torch.cat([scores[k] for k in bucket])
            k_prune = math.floor(fraction * flat.numel() + 1e-9)
            pruned = torch.zeros(flat.numel(), dtype=torch.bool)
            pruned[sorted(range(flat.numel()), key=lambda j: (float(flat[j]), j))[:k_prune]] = True
            offset = 0
            for key in bucket:
                n = scores[key].numel()
                out[key] = ~pruned[offset:offset + n]
                offset += n
    return out


def reference_unstructured(model, names: List[str], score: str, fraction: float, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Exact per-element pruned masks (global scope): float32 scores, ties in (param, index) order."""
    params = dict(model.named_parameters())
    scores = [element_score(score, *known(n, params[n].shape, seed)).float().flatten() for n in names]
    flat = torch.cat(scores)
    k = math.floor(fraction * flat.numel() + 1e-9)
    order = torch.sort(flat, stable=True).indices
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[order[:k]] = True
    out, offset = {}, 0
    for n, s in zip(names, scores):
        out[n] = pruned[offset:offset + s.numel()]
        offset += s.numel()
    return out


def out_module_inputs(model, data, kinds) -> Dict[str, torch.Tensor]:
    """Reference: every group's out-projection input rows over ``data`` (eval mode), float64.

    Plain forward hooks on the modules the library's groups name (which module is checked by the
    structure tests; the statistics here are computed without ``ds_bitter7.calibration``).
    """
    from ds_bitter7.structures import unit_groups

    rows: Dict[str, list] = {}
    hooks = [model.get_submodule(g.out_module).register_forward_pre_hook(
        lambda m, a, key=g.key: rows.setdefault(key, []).append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for g in unit_groups(model, kinds)]
    model.eval()
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).double() for k, v in rows.items()}
