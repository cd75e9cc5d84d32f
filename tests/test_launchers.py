"""launch/train.py under torchrun, the deepspeed launcher and mpirun: 2 CPU ranks, a few steps."""

from __future__ import annotations

import json
import shutil

import pytest
from _launch_util import REPO, TINY_MODEL, VENV_BIN, free_port, run, tiny_ds_config, write_corpus

STEPS = 8


def train_args(tmp_path, summary, extra=()):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    config = tiny_ds_config(tmp_path / "ds.json", bias_compensation=True)
    return ["launch/train.py", "--config", str(config), "--data", str(corpus), *TINY_MODEL,
            "--seq_len", "32", "--steps", str(STEPS), "--eval_every", "4", "--eval_batches", "2",
            "--calibration_batches", "2", "--summary", str(summary), *extra]


def check_summary(path, steps=STEPS):
    summary = json.loads(path.read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == steps
    assert summary["pruning"] and summary["sparsity"]["mlp_neuron"] == pytest.approx(0.5)
    assert summary["ppl_final"] < summary["ppl_start"]
    return summary


def test_torchrun_with_checkpoint_and_resume(tmp_path):
    summary, ckpt = tmp_path / "summary.json", tmp_path / "ckpt"
    run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         *train_args(tmp_path, summary, ["--save_dir", str(ckpt)])], tmp_path)
    first = check_summary(summary)
    assert (ckpt / "latest").read_text().strip() == f"global_step{STEPS}"
    run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         *train_args(tmp_path, summary, ["--save_dir", str(ckpt), "--resume", "--steps", str(STEPS + 2)])],
        tmp_path)
    resumed = json.loads(summary.read_text())
    assert resumed["start_step"] == STEPS and resumed["steps"] == STEPS + 2
    assert resumed["ppl_start"] == pytest.approx(first["ppl_start"])
    assert [r["units_kept"] for r in resumed["layers"]] == [r["units_kept"] for r in first["layers"]]


def test_deepspeed_launcher(tmp_path):
    summary = tmp_path / "summary.json"

    run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
         *train_args(tmp_path, summary)], tmp_path)
    check_summary(summary)


@pytest.mark.skipif(shutil.which("mpirun", path=str(VENV_BIN)) is None and shutil.which("mpirun") is None,
                    reason="no mpirun")
def test_mpirun(tmp_path):
    summary = tmp_path / "summary.json"
    mpirun = shutil.which("mpirun", path=str(VENV_BIN)) or shutil.which("mpirun")
    run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
         "-x", "DS_ACCELERATOR", "-x", "GLOO_SOCKET_IFNAME", "-x", "MASTER_PORT", "-x", "PYTHONPATH",
         "-x", "DS_BITTER7_CACHE", "-x", "HF_DATASETS_CACHE", "-x", "PATH",
         str(VENV_BIN / "python"), *train_args(tmp_path, summary)], tmp_path)
    check_summary(summary)


def test_shell_launchers_are_executable():
    for name in ("run_deepspeed.sh", "run_torchrun.sh", "run_mpirun.sh", "run_multinode.sh"):
        assert (REPO / "launch" / name).stat().st_mode & 0o111
