"""Unit definitions and the fragment arithmetic, against the README's element lists (as tests/reference.py writes them)."""

from __future__ import annotations

import pytest
import torch
from reference import _unit_elements, kept_elements, tiny_model

from ds_bitter7.config import StructureName
from ds_bitter7.structures import apply_zero_plan, unit_groups

KINDS = [StructureName.mlp_neuron, StructureName.attention_head]


def _reference_unit_map(family, model, group) -> dict:
    """{param name: LongTensor(param.shape)} of unit ids (-1: none), from reference.py."""
    out = {}
    kind = "mlp" if group.kind == StructureName.mlp_neuron else "attn"
    for u, elems in enumerate(_unit_elements(family, model, group.layer, kind)):
        for name, idx in elems.items():
            if name not in out:
                out[name] = torch.full(model.get_parameter(name).shape, -1, dtype=torch.long)
            out[name][idx] = u
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unit_elements_match_design(family):
    model = tiny_model(family)
    for group in unit_groups(model, KINDS):
        ref = _reference_unit_map(family, model, group)
        assert {s.name for s in group.slices} == set(ref)
        for s in group.slices:
            full = ref[s.name]
            ids = s.unit_ids.view([-1 if d == s.dim else 1 for d in range(len(s.shape))]).expand(s.shape)
            assert ids.equal(full), s.name
        per_unit = group.params_per_unit()
        assert per_unit.tolist() == [sum(int((t == u).sum()) for t in ref.values()) for u in range(group.n_units)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fragment_sums_and_masks_cover_any_split(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    for group in unit_groups(model, KINDS):
        keep = torch.rand(group.n_units, generator=g) > 0.5
        for s in group.slices:
            numel = int(torch.tensor(s.shape).prod())
            values = torch.rand(numel, generator=g, dtype=torch.float64)
            whole = torch.zeros(group.n_units, dtype=torch.float64)
            s.add_unit_sums(whole, values, 0)
            cuts = sorted({0, numel, *torch.randint(1, numel, (4,), generator=g).tolist()})
            parts = torch.zeros(group.n_units, dtype=torch.float64)
            for a, b in zip(cuts, cuts[1:]):
                s.add_unit_sums(parts, values[a:b], a)
                ones = torch.ones(b - a)
                apply_zero_plan(ones, s.zero_plan(keep, a, b - a))
                assert ones.bool().equal(kept_elements(s, keep, a, b - a))
            assert parts.allclose(whole, rtol=1e-12)
