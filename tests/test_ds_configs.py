"""Every shipped DeepSpeed config parses, for ds_bitter7 and for DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_bitter7.config import check_deepspeed_support, parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"cpu_demo.json", "zero1_bitter7.json", "zero2_bitter7.json", "zero2_bf16_bitter7.json",
            "zero2_magnitude.json", "zero2_movement.json", "zero2_heads_and_neurons.json"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    raw = json.loads(path.read_text())
    cfg = parse_config(str(path))
    assert cfg.enabled
    check_deepspeed_support(raw)
    assert "auto" not in path.read_text()  # accelerate (HF Trainer) rejects "auto"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deepspeed_accepts_config(path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    raw.pop("bitter7")
    ds = DeepSpeedConfig(raw)  # without torch.distributed: world size 1
    assert ds.zero_optimization_stage in (1, 2)
    assert ds.train_micro_batch_size_per_gpu >= 1
