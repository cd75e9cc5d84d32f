"""Which weights form a unit: per-architecture adapters, keyed by ``model.config.model_type``.

A unit group (one MLP or one attention block) is described as data: for every parameter that
holds the group's units, the dimension that indexes units and, for each index along it, the unit
it belongs to (``-1``: no unit). The arithmetic on flat ranges of those parameters (the local
ZeRO fragments) lives here too, so scores and masks never need a full tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .config import StructureName

# Row-aligned chunks of at most this many elements bound the temporary memory of fragment
# reductions (float64 scores: about 40 bytes of temporaries per chunk element).
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ParamSlice:
    """The part of one parameter that belongs to a group's units."""

    name: str  # name in model.named_parameters()
    shape: Tuple[int, ...]  # the parameter's full shape (1-D or 2-D)
    dim: int  # dimension indexed by unit_ids
    unit_ids: torch.Tensor  # LongTensor[shape[dim]]: unit of each index, -1 for none
    _ids_on: Dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def ids_on(self, device: torch.device) -> torch.Tensor:
        """``unit_ids`` on ``device`` (cached: no host-device copy, hence no sync, per chunk)."""
        key = str(device)
        if key not in self._ids_on:
            self._ids_on[key] = self.unit_ids.to(device)
        return self._ids_on[key]

    @property
    def row_len(self) -> int:
        return self.shape[1] if len(self.shape) == 2 else 1

    def chunks(self, start: int, numel: int, max_elements: int = CHUNK_ELEMENTS) -> Iterator[Tuple[int, int]]:
        """Split the flat range [start, start+numel) into row-aligned pieces of bounded size."""
        step = max(self.row_len, (max_elements // self.row_len) * self.row_len)
        pos, end = start, start + numel
        while pos < end:
            nxt = min(end, (pos // step + 1) * step)
            yield pos, nxt - pos
            pos = nxt

    def coord_sums(self, values: torch.Tensor, start: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sum a flat range of per-element values per index along ``dim``.

        ``values`` covers elements [start, start+len) of ``param.view(-1)``. Returns
        (coordinates, sums) with the coordinates along ``dim`` that the range touches.
        """
        if len(self.shape) == 1:
            return torch.arange(start, start + values.numel(), device=values.device), values
        r0, grid = self.row_grid(values, start)
        if self.dim == 0:
            return torch.arange(r0, r0 + grid.shape[0], device=values.device), grid.sum(1)
        return torch.arange(self.row_len, device=values.device), grid.sum(0)

    def row_grid(self, values: torch.Tensor, start: int) -> Tuple[int, torch.Tensor]:
        """The rows a flat range of a 2-D parameter touches: (first row, [rows, cols] grid),
        zero-padded where the range starts or ends inside a row."""
        n, cols = values.numel(), self.row_len
        r0, r1 = start // cols, (start + n - 1) // cols
        padded = values.new_zeros((r1 - r0 + 1) * cols)
        offset = start - r0 * cols
        padded[offset:offset + n] = values
        return r0, padded.view(r1 - r0 + 1, cols)

    def add_unit_sums(self, out: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """``out[u] += sum of values over the elements of unit u`` for a flat range."""
        coords, sums = self.coord_sums(values, start)  # on the device of ``values``
        units = self.ids_on(out.device)[coords.to(out.device)]
        # Coordinates outside any unit go to a dump slot past the end: no boolean indexing (which
        # would synchronise a GPU) on the path that runs once per chunk.
        dump = torch.cat([out, out.new_zeros(1)])
        dump.index_add_(0, torch.where(units >= 0, units, out.numel()), sums.to(out.device, out.dtype))
        out.copy_(dump[:-1])

    def zero_plan(self, unit_keep: torch.Tensor, start: int, numel: int,
                  device: Optional[torch.device] = None) -> List[tuple]:
        """Cheap per-step zeroing of a flat range's pruned elements (see :func:`apply_zero_plan`).

        A range of a 2-D parameter is a partial first row, full middle rows and a partial last
        row; pruned rows or columns are filled through index_fill on those views, which is an
        order of magnitude faster than a full-size boolean mask.
        """
        coords = self.pruned_coords(unit_keep)  # sorted indices along dim
        if coords.numel() == 0:
            return []
        if len(self.shape) == 1:
            idx = coords[(coords >= start) & (coords < start + numel)] - start
            return [("fill", 0, numel, 1, 0, idx.to(device))] if idx.numel() else []
        cols, plan, pos = self.row_len, [], 0
        row, col0 = divmod(start, cols)
        while pos < numel:
            if col0 == 0 and numel - pos >= cols:  # a block of full rows
                rows = (numel - pos) // cols
                if self.dim == 0:
                    idx = coords[(coords >= row) & (coords < row + rows)] - row
                    plan.append(("fill", pos, rows, cols, 0, idx))
                else:
                    plan.append(("fill", pos, rows, cols, 1, coords))
                pos, row = pos + rows * cols, row + rows
                continue
            width = min(cols - col0, numel - pos)  # a partial row
            if self.dim == 0:
                if bool((coords == row).any()):
                    plan.append(("fill", pos, 1, width, 1, torch.arange(width)))
            else:
                idx = coords[(coords >= col0) & (coords < col0 + width)] - col0
                plan.append(("fill", pos, 1, width, 1, idx))
            pos, row, col0 = pos + width, row + 1, 0
        return [op[:5] + (op[5].to(device),) for op in plan if op[5].numel()]

    def pruned_coords(self, unit_keep: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` that belong to a pruned unit."""
        has_unit = self.unit_ids >= 0
        pruned = torch.zeros_like(has_unit)
        pruned[has_unit] = ~unit_keep[self.unit_ids[has_unit]]
        return pruned.nonzero().flatten()


def apply_zero_plan(t: torch.Tensor, plan: List[tuple]) -> None:
    """Zero the elements a :meth:`ParamSlice.zero_plan` names in ``t`` (a flat fragment view)."""
    for _, pos, rows, cols, dim, idx in plan:
        t[pos:pos + rows * cols].view(rows, cols).index_fill_(dim, idx, 0)


@dataclass
class UnitGroup:
    """The units of one structure type in one transformer block."""

    key: str  # "layers.3.mlp"
    kind: StructureName
    layer: int
    n_units: int
    slices: List[ParamSlice]
    out_module: str  # module whose *input* carries the units' activations (c_proj, down_proj, o_proj)
    out_weight: str  # its weight's parameter name
    out_bias: Optional[str]  # its bias's parameter name (None: the model has none)
    out_in_dim: int  # dimension of out_weight that indexes input features (0: Conv1D, 1: Linear)
    feature_units: torch.Tensor  # LongTensor[n_in_features]: unit of each input feature of out_module

    def params_per_unit(self) -> torch.Tensor:
        """LongTensor[n_units]: parameter elements that exist only for each unit."""
        counts = torch.zeros(self.n_units, dtype=torch.long)
        for s in self.slices:
            per_index = 1
            for d, size in enumerate(s.shape):
                if d != s.dim:
                    per_index *= size
            valid = s.unit_ids >= 0
            counts.index_add_(0, s.unit_ids[valid], torch.full((int(valid.sum()),), per_index))
        return counts


@dataclass
class Adapter:
    """Per-architecture description: how to find blocks and their units."""

    model_type: str
    blocks_attr: Tuple[str, ...]  # candidate paths of the block ModuleList, e.g. ("transformer.h", "h")
    mlp_units: Callable[[object, str, int, nn.Module], UnitGroup]
    attn_units: Callable[[object, str, int, nn.Module], UnitGroup]
    unstructured_params: Tuple[str, ...] = field(default=())  # weight suffixes inside a block

    def blocks_prefix(self, model: nn.Module) -> str:
        modules = dict(model.named_modules())
        for path in self.blocks_attr:
            if isinstance(modules.get(path), nn.ModuleList):
                return path
        raise ValueError(f"{self.model_type} model has no block list at any of {list(self.blocks_attr)}")


def _ids(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.long)


def _shape(model: nn.Module, name: str) -> Tuple[int, ...]:
    return tuple(model.get_parameter(name).shape)


def _maybe(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


# --- GPT-2 -------------------------------------------------------------------------------------
# GPT-2's Conv1D stores weights as [in, out]: a neuron is a *column* of c_fc and a *row* of c_proj;
# c_attn fuses q, k and v along the output dimension.


def _gpt2_mlp(model, prefix: str, i: int, config) -> UnitGroup:
    p = f"{prefix}.{i}.mlp"
    n = _shape(model, f"{p}.c_fc.weight")[1]
    ids = torch.arange(n)
    slices = [ParamSlice(f"{p}.c_fc.weight", _shape(model, f"{p}.c_fc.weight"), 1, ids),
              ParamSlice(f"{p}.c_fc.bias", (n,), 0, ids),
              ParamSlice(f"{p}.c_proj.weight", _shape(model, f"{p}.c_proj.weight"), 0, ids)]
    return UnitGroup(f"layers.{i}.mlp", StructureName.mlp_neuron, i, n, slices, f"{p}.c_proj",
                     f"{p}.c_proj.weight", f"{p}.c_proj.bias", 0, ids)


def _gpt2_attn(model, prefix: str, i: int, config) -> UnitGroup:
    p = f"{prefix}.{i}.attn"
    width = _shape(model, f"{p}.c_proj.weight")[0]  # n_head * head_dim of this layer (bitter7_gpt2: its own)
    head_dim = config.n_embd // config.n_head
    n_head = width // head_dim
    head = _ids(torch.arange(width) // head_dim)  # [width]
    qkv = torch.cat([head, head, head])
    slices = [ParamSlice(f"{p}.c_attn.weight", _shape(model, f"{p}.c_attn.weight"), 1, qkv),
              ParamSlice(f"{p}.c_attn.bias", (3 * width,), 0, qkv),
              ParamSlice(f"{p}.c_proj.weight", _shape(model, f"{p}.c_proj.weight"), 0, head)]
    return UnitGroup(f"layers.{i}.attn", StructureName.attention_head, i, n_head, slices,
                     f"{p}.c_proj", f"{p}.c_proj.weight", f"{p}.c_proj.bias", 0, head)


# --- LLaMA family (also Mistral, Qwen2): SwiGLU MLP, grouped-query attention -------------------


def _llama_mlp(model, prefix: str, i: int, config) -> UnitGroup:
    p = f"{prefix}.{i}.mlp"
    n = _shape(model, f"{p}.gate_proj.weight")[0]
    ids = torch.arange(n)
    slices = []
    for proj in ("gate_proj", "up_proj"):
        slices.append(ParamSlice(f"{p}.{proj}.weight", _shape(model, f"{p}.{proj}.weight"), 0, ids))
        if _maybe(model, f"{p}.{proj}.bias"):
            slices.append(ParamSlice(f"{p}.{proj}.bias", (n,), 0, ids))
    slices.append(ParamSlice(f"{p}.down_proj.weight", _shape(model, f"{p}.down_proj.weight"), 1, ids))
    bias = f"{p}.down_proj.bias" if _maybe(model, f"{p}.down_proj.bias") else None
    return UnitGroup(f"layers.{i}.mlp", StructureName.mlp_neuron, i, n, slices, f"{p}.down_proj",
                     f"{p}.down_proj.weight", bias, 1, ids)


def _llama_attn(model, prefix: str, i: int, config) -> UnitGroup:
    p = f"{prefix}.{i}.self_attn"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_q = _shape(model, f"{p}.q_proj.weight")[0] // head_dim
    n_kv = _shape(model, f"{p}.k_proj.weight")[0] // head_dim
    per_group = n_q // n_kv  # query heads reading each key/value group
    q_ids = _ids(torch.arange(n_q * head_dim) // head_dim // per_group)
    kv_ids = _ids(torch.arange(n_kv * head_dim) // head_dim)
    slices = []
    for proj, ids in (("q_proj", q_ids), ("k_proj", kv_ids), ("v_proj", kv_ids)):
        slices.append(ParamSlice(f"{p}.{proj}.weight", _shape(model, f"{p}.{proj}.weight"), 0, ids))
        if _maybe(model, f"{p}.{proj}.bias"):
            slices.append(ParamSlice(f"{p}.{proj}.bias", (ids.numel(),), 0, ids))
    slices.append(ParamSlice(f"{p}.o_proj.weight", _shape(model, f"{p}.o_proj.weight"), 1, q_ids))
    bias = f"{p}.o_proj.bias" if _maybe(model, f"{p}.o_proj.bias") else None
    return UnitGroup(f"layers.{i}.attn", StructureName.attention_head, i, n_kv, slices,
                     f"{p}.o_proj", f"{p}.o_proj.weight", bias, 1, q_ids)


_GPT2 = Adapter("gpt2", ("transformer.h", "h"), _gpt2_mlp, _gpt2_attn,
                ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
_LLAMA = Adapter("llama", ("model.layers", "layers"), _llama_mlp, _llama_attn,
                 tuple(f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
                 + tuple(f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")))

# The adapters read each block's widths from its weights, so the exported types (ds_bitter7.models:
# per-block widths, base head_dim and query heads per key/value group) prune again as they train.
ADAPTERS: Dict[str, Adapter] = {"gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
                                "bitter7_gpt2": _GPT2, "bitter7_llama": _LLAMA, "bitter7_mistral": _LLAMA}


def register_adapter(model_type: str, adapter: Adapter) -> None:
    """Make a new ``model.config.model_type`` prunable (masks, scores, compensation). Exporting it
    smaller needs a model class of the new widths: ``shrink`` builds those for its own types only."""
    ADAPTERS[model_type] = adapter


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model.config.model_type``; raises with the supported list."""
    return adapter_for(getattr(getattr(model, "config", None), "model_type", None))


def adapter_for(model_type: Optional[str]) -> Adapter:
    """The adapter for ``model_type``; ``ValueError`` naming the supported types."""
    if model_type not in ADAPTERS:
        raise ValueError(f"ds_bitter7 has no structure adapter for model_type={model_type!r} "
                         f"(supported: {sorted(ADAPTERS)}); register one with "
                         "ds_bitter7.structures.register_adapter")
    return ADAPTERS[model_type]


def count_blocks(model: nn.Module) -> int:
    """The number of transformer blocks; ``ValueError`` for a model without any (nothing to prune)."""
    return _blocks(model)[2]


def _blocks(model: nn.Module) -> Tuple[Adapter, str, int]:
    """(adapter, the block list's path, its length): ``ValueError`` for an unsupported model or
    one without blocks."""
    adapter = get_adapter(model)
    prefix = adapter.blocks_prefix(model)
    n_blocks = len(model.get_submodule(prefix))
    if n_blocks == 0:
        raise ValueError(f"the {model.config.model_type} model has no blocks ({prefix} is empty): nothing to prune")
    return adapter, prefix, n_blocks


def unit_groups(model: nn.Module, kinds: List[StructureName]) -> List[UnitGroup]:
    """Every block's unit groups for the structured kinds, in block order (mlp before attn)."""
    adapter, prefix, n_blocks = _blocks(model)
    groups = []
    for i in range(n_blocks):
        if StructureName.mlp_neuron in kinds:
            groups.append(adapter.mlp_units(model, prefix, i, model.config))
        if StructureName.attention_head in kinds:
            groups.append(adapter.attn_units(model, prefix, i, model.config))
    return groups


def unstructured_params(model: nn.Module) -> List[str]:
    """Names of the block weight matrices that ``unstructured`` pruning ranks element by element."""
    adapter, prefix, n_blocks = _blocks(model)
    return [f"{prefix}.{i}.{s}" for i in range(n_blocks) for s in adapter.unstructured_params
            if _maybe(model, f"{prefix}.{i}.{s}")]
