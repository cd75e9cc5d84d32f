"""Smoke tests of benchmarks/quality.py and its Torch-Pruning peer (no training runs)."""

import argparse
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import quality  # noqa: E402

from ds_bitter7.config import parse_config  # noqa: E402


def _args(**kw):
    base = dict(steps=100, micro_batch=8, lr=2e-3, calibration_batches=4)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("setting", list(quality.SETTINGS))
@pytest.mark.parametrize("method", [m for m in quality.METHODS if m not in ("dense", quality.PEER)])
def test_generated_configs_parse(method, setting, tmp_path):
    cfg = quality.ds_config(method, setting, _args(), str(tmp_path))
    section = parse_config(cfg)
    structures, sparsity = quality.SETTINGS[setting]
    assert section.target_sparsity == sparsity
    assert [getattr(s, "value", s) for s in section.structures] == structures
    assert section.schedule.start_step == 20 and section.schedule.end_step == 70


def test_dense_config_has_no_pruning(tmp_path):
    assert "bitter7" not in quality.ds_config("dense", "mlp50", _args(), str(tmp_path))


def test_plan_runs_dense_once_and_peer_on_mlp_only():
    args = argparse.Namespace(seeds=[1, 2], methods=list(quality.METHODS), settings=list(quality.SETTINGS))
    todo = quality.plan(args)
    assert sum(m == "dense" for m, _, _ in todo) == 2
    assert not any(m == quality.PEER and "heads" in s for m, s, _ in todo)
    assert len(todo) == len(set(todo))


def test_read_curve(tmp_path):
    path = tmp_path / "Val_ppl.csv"
    path.write_text("step,ppl\n0,100.0\n10,50.0\n10,40.0\n")
    assert quality.read_curve(str(path)) == [[0, 100.0], [10, 40.0]]


def test_summary_ratio_and_plain_verdict():
    runs = [dict(method=m, setting="mlp50", seed=s, ppl=p, sparsity={"mlp_neuron": 0.5})
            for m, s, p in [("magnitude", 1, 10.0), ("magnitude", 2, 12.0), ("bitter7", 1, 12.0), ("bitter7", 2, 13.0)]]
    rows = quality.summarise(runs)
    b7 = next(r for r in rows if r["method"] == "bitter7")
    assert b7["ratio_to_magnitude"] == pytest.approx(12.5 / 11.0)
    assert b7["ppl_std"] == pytest.approx(0.7071, abs=1e-3)
    assert "does NOT beat magnitude" in quality.verdicts(rows)[0]


def test_peer_prunes_gpt2_mlp_neurons_globally():
    pytest.importorskip("torch_pruning")
    import peer_torch_pruning as peer

    from ds_bitter7 import modeling

    model = modeling.build_model("tiny-gpt2", 257, 64, seed=0)
    total = peer.count_neurons(model)
    ids = torch.randint(0, 257, (2, 16))
    ref = model(input_ids=ids).logits
    mlps, outs = peer.mlp_blocks(model)
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)  # Conv1D -> Linear is exact
    kept = peer.tp_prune_mlp(model, mlps, outs, 0.5)
    assert kept == total - total // 2
    assert model(input_ids=ids).logits.shape == ref.shape
