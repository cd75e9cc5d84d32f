"""Shrinking a masked model removes the pruned units and leaves its logits unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import ds_bitter7.models  # noqa: F401  (registers bitter7_gpt2 / bitter7_llama)
from ds_bitter7.shrink import shrink_model, unit_counts, zero_pruned_units_

N_LAYER = 3


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_head=4, n_layer=N_LAYER, n_inner=64, vocab_size=97, n_positions=64,
                        initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(extra_bias: bool = False) -> LlamaForCausalLM:
    """GQA: 8 query heads in 4 key/value groups (2 query heads per unit), head_dim 8."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                         intermediate_size=48, num_hidden_layers=N_LAYER, vocab_size=97,
                         max_position_embeddings=64, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    if extra_bias:  # the pruner adds a compensation bias that LlamaConfig has no flag for
        for layer in model.model.layers:
            for proj in (layer.mlp.down_proj, layer.self_attn.o_proj):
                proj.bias = nn.Parameter(torch.zeros(proj.out_features))
    return model


def tiny_llama_like(model_type: str, extra_bias: bool = False):
    """Mistral (no window binds: 64 tokens, window 64) or Qwen2 (q/k/v biases), shaped as tiny_llama."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        model_type]
    config = config_cls(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=48,
                        num_hidden_layers=N_LAYER, vocab_size=97, max_position_embeddings=64, initializer_range=0.2,
                        bos_token_id=0, eos_token_id=0, **({"sliding_window": 64} if model_type == "mistral" else {}))
    model = model_cls(config).eval()
    if extra_bias:  # compensation biases on down_proj and o_proj, which Qwen2 has no flag for
        for layer in model.model.layers:
            for proj in (layer.mlp.down_proj, layer.self_attn.o_proj):
                proj.bias = nn.Parameter(torch.zeros(proj.out_features))
    return model


def blocks_and_units(model):
    """(block, n_neurons, n_attention_units, head_dim, query heads per unit) per block."""
    c = model.config
    if c.model_type == "gpt2":
        return [(b, b.mlp.c_fc.weight.shape[1], c.n_head, c.n_embd // c.n_head, 1) for b in model.transformer.h]
    group = c.num_attention_heads // c.num_key_value_heads
    return [(b, c.intermediate_size, c.num_key_value_heads, c.head_dim, group) for b in model.model.layers]


@torch.no_grad()
def zero_units(model, masks):
    """Zero each pruned unit's elements as the README's element lists define them (independent of the library),
    and give the next layers random nonzero biases, as bias compensation would."""
    gpt2 = model.config.model_type == "gpt2"
    for i, (block, _, _, hd, group) in enumerate(blocks_and_units(model)):
        for n in (~masks[f"layers.{i}.mlp"]).nonzero().flatten().tolist():
            if gpt2:
                block.mlp.c_fc.weight[:, n] = 0
                block.mlp.c_fc.bias[n] = 0
                block.mlp.c_proj.weight[n, :] = 0
            else:
                block.mlp.gate_proj.weight[n] = 0
                block.mlp.up_proj.weight[n] = 0
                block.mlp.down_proj.weight[:, n] = 0
        for u in (~masks[f"layers.{i}.attn"]).nonzero().flatten().tolist():
            if gpt2:
                width = block.attn.c_attn.weight.shape[1] // 3
                for part in range(3):
                    cols = slice(part * width + u * hd, part * width + (u + 1) * hd)
                    block.attn.c_attn.weight[:, cols] = 0
                    block.attn.c_attn.bias[cols] = 0
                block.attn.c_proj.weight[u * hd:(u + 1) * hd] = 0
            else:
                attn = block.self_attn
                attn.k_proj.weight[u * hd:(u + 1) * hd] = 0
                attn.v_proj.weight[u * hd:(u + 1) * hd] = 0
                q = slice(u * group * hd, (u + 1) * group * hd)
                attn.q_proj.weight[q] = 0
                attn.o_proj.weight[:, q] = 0
        nexts = [block.mlp.c_proj, block.attn.c_proj] if gpt2 else [block.mlp.down_proj, block.self_attn.o_proj]
        for proj in nexts:
            if proj.bias is not None:
                proj.bias.normal_()


def random_masks(model, scope: str, attn: bool = True, seed: int = 1):
    """global: a different kept count per block; per_layer: half the units in every block."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for i, (_, n_mlp, n_attn, _, _) in enumerate(blocks_and_units(model)):
        for kind, n in (("mlp", n_mlp), ("attn", n_attn)):
            kept = (i % (n - 1)) + 1 if scope == "global" else n // 2
            if kind == "attn" and not attn:
                kept = n
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=gen)[:kept]] = True
            masks[f"layers.{i}.{kind}"] = mask
    return masks


def logits(model, seed: int = 2) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def saved_and_loaded(model, masks, tmp_path):
    """Shrink the masked ``model``, save it, load it back with transformers; the logits must match."""
    small, _ = shrink_model(model, masks)
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_close(logits(loaded), logits(model))
    return loaded


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rel = ((actual - expected).norm() / expected.norm()).item()
    assert rel <= 1e-5, rel


MODELS = {"gpt2": tiny_gpt2, "llama_gqa": tiny_llama, "llama_extra_bias": lambda: tiny_llama(extra_bias=True),
          "mistral": lambda: tiny_llama_like("mistral"), "qwen2": lambda: tiny_llama_like("qwen2"),
          "qwen2_extra_bias": lambda: tiny_llama_like("qwen2", True)}


@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_shrunk_logits_equal_masked_logits(name, scope):
    model = MODELS[name]()
    masks = random_masks(model, scope)
    zero_units(model, masks)
    small, _ = shrink_model(model, masks)
    assert_close(logits(small), logits(model))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_library_zeroing_matches_unit_definitions(name):
    model, reference = MODELS[name](), MODELS[name]()
    masks = random_masks(model, "global")
    zero_units(reference, masks)
    zero_pruned_units_(model, masks)
    for (key, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        if key.endswith(("c_proj.bias", "down_proj.bias", "o_proj.bias")):
            continue  # the reference also randomises the compensation biases
        assert torch.equal(got == 0, want == 0), key


@pytest.mark.parametrize("name,model_type", [("gpt2", "gpt2"), ("llama_gqa", "llama"), ("llama_extra_bias", "llama"),
                                             ("mistral", "mistral"), ("qwen2", "qwen2")])
def test_per_layer_neuron_pruning_saves_a_standard_model(name, model_type, tmp_path):
    model = MODELS[name]()
    masks = random_masks(model, "per_layer", attn=False)
    zero_units(model, masks)
    small, _ = shrink_model(model, masks)
    small.save_pretrained(tmp_path)
    assert small.config.model_type == model_type
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__module__.startswith("transformers.")
    assert_close(logits(loaded), logits(model))


@pytest.mark.parametrize("name,model_type", [("gpt2", "bitter7_gpt2"), ("llama_gqa", "bitter7_llama"),
                                             ("mistral", "bitter7_llama"), ("qwen2_extra_bias", "bitter7_llama")])
def test_global_widths_save_a_custom_type_that_loads_back(name, model_type, tmp_path):
    model = MODELS[name]()
    masks = random_masks(model, "global")
    zero_units(model, masks)
    assert saved_and_loaded(model, masks, tmp_path).config.model_type == model_type


def test_per_layer_gqa_heads_export_to_standard_llama():
    model = tiny_llama()
    masks = random_masks(model, "per_layer")  # 2 of 4 groups: 4 query heads, 2 kv heads
    zero_units(model, masks)
    small, _ = shrink_model(model, masks)
    assert small.config.model_type == "llama"
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)
    assert_close(logits(small), logits(model))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_mlp_parameters_fall_by_the_pruned_fraction(name):
    model = MODELS[name]()
    masks = random_masks(model, "global")
    zero_units(model, masks)
    small, report = shrink_model(model, masks)
    for row in report:
        if row["kind"] != "mlp":
            continue
        mlp = (small.transformer.h if name == "gpt2" else small.model.layers)[row["layer"]].mlp
        after = sum(p.numel() for p in mlp.parameters())
        assert after == row["params_after"]
        next_bias = model.config.hidden_size if name == "gpt2" else 0  # c_proj.bias is not a unit's
        unit_params = row["params_before"] - next_bias
        pruned = 1 - row["units_kept"] / row["units_total"]
        assert row["params_before"] - row["params_after"] == round(pruned * unit_params)


def test_fully_pruned_block_keeps_one_zero_unit():
    model = tiny_gpt2()
    masks = random_masks(model, "global")
    masks["layers.1.mlp"][:] = False
    masks["layers.2.attn"][:] = False
    zero_units(model, masks)
    small, report = shrink_model(model, masks)
    assert small.transformer.h[1].mlp.c_fc.weight.shape[1] == 1
    assert small.config.num_heads_per_layer[2] == 1
    assert [(r["units_kept"], r["units_in_model"]) for r in report if r["layer"] == 1 and r["kind"] == "mlp"] == [(0, 1)]
    assert all(r["units_in_model"] == r["units_kept"] for r in report if r["units_kept"])
    assert_close(logits(small), logits(model))


@pytest.mark.parametrize("bad,message", [
    ({"layers.9.mlp": torch.ones(64, dtype=torch.bool)}, "unknown key 'layers.9.mlp'"),
    ({"layers.0.mlp": torch.ones(63, dtype=torch.bool)}, "has 63 units; the model has 64"),
    ({"layers.0.attn": torch.ones(4)}, "1-D bool tensor"),
])
def test_masks_that_do_not_match_the_model_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        shrink_model(tiny_gpt2(), bad)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_exported_model_shrinks_again(name, tmp_path):
    """A bitter7_* export, pruned again (its units read from its own weights), exports again."""
    model = MODELS[name]()
    masks = random_masks(model, "global")
    zero_units(model, masks)
    small = saved_and_loaded(model, masks, tmp_path / "once")
    assert small.config.model_type == "bitter7_" + name.split("_")[0]
    gen = torch.Generator().manual_seed(5)
    again = {k: (torch.rand(n, generator=gen) < 0.6).index_fill_(0, torch.tensor([0]), True)
             for k, n in unit_counts(small.state_dict(), small.config).items()}
    zero_pruned_units_(small, again)
    smaller = saved_and_loaded(small, again, tmp_path / "twice")
    assert unit_counts(smaller.state_dict(), smaller.config) == {k: int(m.sum()) for k, m in again.items()}


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_layers_pruned_whole_are_named_and_stay_placeholders(name, tmp_path):
    """A block that lost every unit of a kind keeps one all-zero unit, named in the config
    (placeholder_units); an export of that export names it again, whether its masks prune it
    (as the pruner does) or leave the block out."""
    model = MODELS[name]()
    masks = {k: torch.ones_like(m) for k, m in random_masks(model, "per_layer").items()}
    masks["layers.1.attn"][:] = False
    zero_units(model, masks)
    once = saved_and_loaded(model, masks, tmp_path / "once")
    assert once.config.model_type.startswith("bitter7_") and once.config.placeholder_units == ["layers.1.attn"]
    for again in ({"layers.1.attn": torch.zeros(1, dtype=torch.bool)}, {}):
        assert shrink_model(once, again)[0].config.placeholder_units == ["layers.1.attn"]


def test_placeholder_units_are_checked_by_the_config():
    from ds_bitter7.models import Bitter7GPT2Config, Bitter7LlamaConfig

    sizes = {"n_layer": 2, "n_embd": 32, "n_head": 4, "intermediate_sizes": [8, 1], "num_heads_per_layer": [4, 2]}
    assert Bitter7GPT2Config(**sizes, placeholder_units=["layers.1.mlp"]).placeholder_units == ["layers.1.mlp"]
    for units, message in ((["layer.1.mlp"], "'layer.1.mlp': expected 'layers.<i>.mlp' or 'layers.<i>.attn' with i < 2"),
                           (["layers.2.mlp"], "with i < 2"), (["layers.1.attn"], "which is 2 units wide, not 1")):
        with pytest.raises(Exception, match=message):
            Bitter7GPT2Config(**sizes, placeholder_units=units)
    with pytest.raises(Exception, match="'layers.0.mlp', which is 8 units wide"):
        Bitter7LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_sizes=[8, 1], placeholder_units=["layers.0.mlp"])


def test_qwen2_with_compensation_biases_exports_as_bitter7_llama(tmp_path):
    """Qwen2 has no flag for a bias on o_proj / down_proj: even uniform widths need bitter7_llama."""
    model = MODELS["qwen2_extra_bias"]()
    masks = random_masks(model, "per_layer", attn=False)
    zero_units(model, masks)
    assert saved_and_loaded(model, masks, tmp_path).config.model_type == "bitter7_llama"


def test_uniform_heads_the_standard_config_refuses_export_as_bitter7_llama(tmp_path):
    """3 of 4 key/value groups in every block: 6 query heads do not divide hidden_size 64, which
    LlamaConfig's strict validation refuses; the export falls back to bitter7_llama."""
    model = tiny_llama()
    masks = random_masks(model, "per_layer")
    for key in masks:
        if key.endswith(".attn"):
            masks[key] = torch.tensor([True, True, False, True])
    zero_units(model, masks)
    assert saved_and_loaded(model, masks, tmp_path).config.model_type == "bitter7_llama"


@pytest.mark.parametrize("extra_bias", [False, True])
def test_binding_sliding_window_exports_as_bitter7_mistral(tmp_path, extra_bias):
    """A 4-token window under 11-token inputs changes the output: the export keeps Mistral's blocks
    and window, with different widths per block (and the compensation biases Mistral cannot hold)."""
    model = tiny_llama_like("mistral", extra_bias)
    model.config.sliding_window = 4
    masks = random_masks(model, "global")
    zero_units(model, masks)
    unwindowed = copy.deepcopy(model)
    unwindowed.config.sliding_window = None  # the copy's blocks share its config
    assert not torch.allclose(logits(unwindowed), logits(model), atol=1e-3)  # the window binds
    loaded = saved_and_loaded(model, masks, tmp_path)
    assert loaded.config.model_type == "bitter7_mistral" and loaded.config.sliding_window == 4


def test_binding_sliding_window_of_qwen2_is_refused_for_different_widths():
    model = tiny_llama_like("qwen2")
    model.config.use_sliding_window, model.config.sliding_window = True, 4
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    masks = random_masks(model, "global")
    zero_units(model, masks)
    with pytest.raises(NotImplementedError, match="sliding attention window \\(4 tokens.*scope: per_layer"):
        shrink_model(model, masks)


def test_qwen2_whose_window_binds_is_warned_about_at_the_start(caplog):
    """The export's refusal came only after the whole run: prepare_model (initialize) says it first."""
    import ds_bitter7

    model = tiny_llama_like("qwen2")
    model.config.use_sliding_window, model.config.sliding_window = True, 4
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    for section, warned in (({"scope": "global"}, "with scope global its pruned model cannot be exported"),
                            ({"scope": "per_layer", "bias_compensation": {"enabled": True}}, "with bias compensation"),
                            ({"scope": "per_layer"}, None),
                            ({"structures": ["unstructured"]}, None)):  # no width changes
        caplog.clear()
        with caplog.at_level("WARNING", logger="ds_bitter7"):
            ds_bitter7.prepare_model(copy.deepcopy(model), ds_bitter7.parse_config({"bitter7": section}))
        found = [r.getMessage() for r in caplog.records if "sliding window (4 tokens) binds" in r.getMessage()]
        assert (found and warned in found[0]) if warned else not found, (section, found)


def test_qwen2_window_of_no_layer_exports_as_bitter7_llama(tmp_path):
    """use_sliding_window with max_window_layers >= its layers: no block slides (layer_types all
    full_attention), so the window never binds and different widths export as bitter7_llama."""
    from transformers import Qwen2Config

    model = tiny_llama_like("qwen2")
    model.config = Qwen2Config(**{**model.config.to_dict(), "use_sliding_window": True, "sliding_window": 4,
                                  "max_window_layers": model.config.num_hidden_layers, "layer_types": None})
    assert set(model.config.layer_types) == {"full_attention"} and model.config.sliding_window == 4
    masks = random_masks(model, "global")
    zero_units(model, masks)
    assert saved_and_loaded(model, masks, tmp_path).config.model_type == "bitter7_llama"
