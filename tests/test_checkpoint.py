"""Pruner state through DeepSpeed checkpoints: exact resume, universal re-sharding, bad files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import workers
from distributed import run_distributed

BITTER7 = {"structures": ["mlp_neuron", "attention_head"], "target_sparsity": 0.5, "score": "movement",
           "schedule": {"start_step": 2, "end_step": 6, "frequency": 2}}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    return ckpt, run_distributed(workers.resume_run, 2, ckpt, "full", BITTER7, {})


@pytest.mark.parametrize("order", ["same", "reversed"])
def test_resume_same_world_size_matches_uninterrupted_run(full_run, order):
    """'reversed': the config lists the same structure types in the other order (each type is
    pruned on its own; the resume was refused as another set of structures)."""
    ckpt, full = full_run
    assert os.path.isfile(os.path.join(ckpt, "global_step3", "bitter7_rank1.pt"))
    bitter7 = BITTER7 if order == "same" else {**BITTER7, "structures": BITTER7["structures"][::-1]}
    resumed = run_distributed(workers.resume_run, 2, ckpt, "resume", bitter7, {})
    for a, b in zip(full, resumed):
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=0)
        assert all(b["masks"][k].equal(a["masks"][k]) for k in a["masks"])
        assert b["events"] == a["events"] == [2, 4, 6]
        assert b["zero"] == {"master": True, "moments": True, "model": True}


@pytest.mark.parametrize("phase", ["resume", "rollback"])
def test_unstructured_resume_matches_uninterrupted_run(phase, tmp_path):
    """Each rank's unstructured masks come back from its rank file, and the global counts with them
    (the sparsity report read zero after a resume). 'rollback': an engine that pruned further than
    the checkpoint loads it; the later masks must not zero weights the checkpoint has alive."""
    bitter7 = {**BITTER7, "structures": ["unstructured"], "score": "bitter7",
               "schedule": {"start_step": 1, "end_step": 5, "frequency": 2}}  # pruned by step 3
    full = run_distributed(workers.resume_run, 2, str(tmp_path / "full"), "full", bitter7, {})
    if phase == "resume":
        resumed = run_distributed(workers.resume_run, 2, str(tmp_path / "full"), "resume", bitter7, {})
    else:
        resumed = run_distributed(workers.resume_run, 2, str(tmp_path / "rollback"), "rollback", bitter7, {})
    for a, b in zip(full, resumed):
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=0)
        assert b["unstructured"] == a["unstructured"] and sum(a["unstructured"][0]) > 0  # at step 3 and 6
        assert b["unstructured"][1] > b["unstructured"][0]  # step 5 pruned further than the checkpoint
        assert b["zero"] == {"master": True, "moments": True, "model": True}


@pytest.mark.parametrize("mode", ["mean", "least_squares"])  # least squares: one F x F sum per group
def test_resume_inside_the_training_window_matches_uninterrupted_run(mode, tmp_path):
    """Source 'training': the forwards of the window a checkpoint was saved in come back with it
    (step 3's, for the event at step 4), so the resumed event compensates on the same rows."""
    bitter7 = {"structures": ["mlp_neuron"], "score": "bitter7", "target_sparsity": 0.5,
               "schedule": {"start_step": 2, "end_step": 6, "frequency": 2, "shape": "linear"},
               "bias_compensation": {"enabled": True, "source": "training", "window": 2, "mode": mode}}
    full = run_distributed(workers.resume_run, 2, str(tmp_path), "full", bitter7, {})
    resumed = run_distributed(workers.resume_run, 2, str(tmp_path), "resume", bitter7, {})
    for a, b in zip(full, resumed):
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=0)
        assert b["stats_rows"][1:] == a["stats_rows"][1:] == [2 * 2 * 2 * 16] * 2  # 2 steps, 2 ranks, 2 x 16 tokens
        assert all(b["masks"][k].equal(a["masks"][k]) for k in a["masks"])


def test_window_saved_under_another_compensation_mode_restarts(tmp_path):
    """A window summed for 'mean' (vectors, one sum per step) cannot feed 'least_squares' (F x F,
    one sum per event): resumed under least squares, it restarts instead of failing, so the event
    at step 4 sees only the forwards taken since the resume (step 4's, not steps 3 and 4)."""
    bitter7 = {"structures": ["mlp_neuron"], "score": "bitter7", "target_sparsity": 0.5,
               "schedule": {"start_step": 2, "end_step": 6, "frequency": 2, "shape": "linear"},
               "bias_compensation": {"enabled": True, "source": "training", "window": 2, "mode": "mean"}}
    run_distributed(workers.resume_run, 2, str(tmp_path), "full", bitter7, {})
    least_squares = {**bitter7, "bias_compensation": {**bitter7["bias_compensation"], "mode": "least_squares"}}
    resumed = run_distributed(workers.resume_run, 2, str(tmp_path), "resume", least_squares, {})
    for res in resumed:
        assert res["events"] == [2, 4, 6] and res["zero"] == {"master": True, "moments": True, "model": True}
        assert res["stats_rows"][1:] == [2 * 2 * 16, 2 * 2 * 2 * 16]  # 1 step after the resume, then 2


@pytest.mark.parametrize("world_size", [1, 2, 3])  # 2: a universal checkpoint has no rank files
def test_resume_at_other_world_size_through_universal_checkpoint(full_run, world_size, tmp_path):
    ckpt, _ = full_run
    out = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                          os.path.join(ckpt, "global_step3"), "--output_folder",
                          os.path.join(ckpt, "global_step3_universal"), "--inject_missing_state"],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = run_distributed(workers.resume_run, world_size, ckpt, "resume", BITTER7,
                              {"checkpoint": {"load_universal": True}})
    for res in results:
        assert res["steps"] == 6 and res["events"] == [2, 4, 6]
        assert res["zero"] == {"master": True, "moments": True, "model": True}
        pruned = {k: int((~m).sum()) for k, m in res["masks"].items()}
        assert sum(v for k, v in pruned.items() if k.endswith("mlp")) == 96  # floor(0.5 * 2 * 96)


def test_checkpoint_without_pruner_state_fails_on_every_rank(tmp_path):
    run_distributed(workers.plain_deepspeed_checkpoint, 2, str(tmp_path))
    errors = run_distributed(workers.load_expecting_error, 2, str(tmp_path), BITTER7)
    for err in errors:
        assert "has no bitter7 pruner state" in err and "mp_rank_00_model_states.pt" in err


def test_mismatched_structures_fail_on_every_rank(full_run):
    ckpt, _ = full_run
    errors = run_distributed(workers.load_expecting_error, 2, ckpt, {**BITTER7, "structures": ["mlp_neuron"]})
    for err in errors:
        assert "does not match" in err and "structures" in err and "global_step3" in err


def test_truncated_rank_file_fails_on_every_rank(tmp_path):
    ckpt = str(tmp_path)
    run_distributed(workers.resume_run, 2, ckpt, "full", BITTER7, {})
    errors = run_distributed(workers.load_expecting_error, 2, ckpt, BITTER7, 1)
    assert "cannot read bitter7 pruner state file" in errors[1] and "bitter7_rank1.pt" in errors[1]
    assert errors[0]  # rank 0's file is fine, but it must not wait forever: it fails too


def test_a_rank_file_of_another_save_fails_on_every_rank(tmp_path):
    """A rank's bitter7 file copied in from another save loaded without a word: its unstructured
    masks (an earlier step's) brought pruned weights back."""
    ckpt = str(tmp_path)
    run_distributed(workers.resume_run, 2, ckpt, "full", BITTER7, {})
    path = tmp_path / "global_step3" / "bitter7_rank1.pt"
    local = torch.load(path, weights_only=False)
    torch.save({**local, "step": 2}, path)
    errors = run_distributed(workers.load_expecting_error, 2, ckpt, BITTER7)
    assert "bitter7_rank1.pt was saved at step 2, the checkpoint at step 3" in errors[1], errors
    assert errors[0]  # rank 0's file is fine, but it fails too


def test_zero_rank_files_of_another_save_or_rank_are_named(full_run, tmp_path):
    """DeepSpeed loads a tag folder whose ZeRO rank files are not of one save without a word (resume,
    export and one-shot then used weights partly of another step, or one partition twice)."""
    import shutil

    from ds_bitter7.checkpoint_files import checkpoint_problems

    ckpt, _ = full_run
    names = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    mixed = tmp_path / "mixed"
    shutil.copytree(ckpt, mixed)
    assert checkpoint_problems(str(mixed)) == []
    rank1 = mixed / "global_step3" / names[1]
    saved = torch.load(rank1, weights_only=False)
    for state in saved["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
        state["step"] = torch.tensor(2.0)  # as the file of an earlier save
    torch.save(saved, rank1)
    assert checkpoint_problems(str(mixed)) == [
        f"the ZeRO rank files of {str(mixed / 'global_step3')!r} hold different optimizer steps (3 in rank(s) [0]; "
        "2 in rank(s) [1]): a rank's file of another save was copied in; copy the tag folder again"]
    shutil.copy(mixed / "global_step3" / names[0], rank1)
    assert checkpoint_problems(str(mixed)) == [
        f"the ZeRO rank files of ranks [0, 1] in {str(mixed / 'global_step3')!r} hold the same tensors: one "
        "rank's file was copied over another's; copy the tag folder again"]


def test_ranks_whose_partitions_lie_in_one_parameter_are_not_copies(tmp_path):
    """A parameter larger than a partition (an embedding) gives the ranks inside it the same
    parameter ranges: ranges read as "the same partition" refused real checkpoints."""
    from ds_bitter7.checkpoint_files import checkpoint_problems

    run_distributed(workers.one_large_parameter_checkpoint, 3, str(tmp_path))
    assert checkpoint_problems(str(tmp_path)) == []


def test_latest_names_a_checkpoint_only_once_every_rank_file_is_written(tmp_path):
    """A save that fails on one rank (here: its pruner file, disk full) fails on every rank and
    leaves ``latest`` at the previous checkpoint, which loads; the wrapped save and load take
    DeepSpeed's positional arguments; a missing tag is named."""
    results = run_distributed(workers.failed_save_keeps_latest, 2, str(tmp_path), BITTER7)
    assert "No space left on device" in results[1]["error"]
    assert "failed on another rank" in results[0]["error"]
    for res in results:
        assert res["latest"] == "good" and res["steps"] == [3, 3] and res["client"] == ["mine", "mine"]
        assert "exclude_frozen_parameters" in res["signature"]  # transformers looks for it there
        # a tag that is not there is named with the tags that are, not DeepSpeed's bare assertion
        assert f"checkpoint tag folder {tmp_path}/nope does not exist (tags in {tmp_path}: ['bad', 'good'])" \
            in res["error"], res["error"]


def test_resume_past_the_schedule_end_under_a_higher_target_is_said(tmp_path):
    """Nothing prunes further once end_step has passed: a silently ignored new target is refused by
    a warning that says how to reach it. A pruner state that is not the weights' is refused."""
    results = run_distributed(workers.raised_target_after_end, 2, str(tmp_path), BITTER7)
    warnings = results[0]["warnings"]
    assert any("resumed at step 7" in w and "pruned to 0.5000, below this config's 0.7500" in w
               and "schedule.end_step 6 has passed" in w for w in warnings), warnings
    for res in results:  # masks of other units than the weights' zeros: refused on every rank
        assert "the model's weights do not match the bitter7 pruner state in another run: units it marks " \
            "pruned have nonzero weights in layers.0.mlp" in res["error"], res["error"]


def test_an_empty_file_is_named_as_empty(tmp_path):
    """torch's error for a zero-byte file speaks of mmap and zip files."""
    from ds_bitter7.checkpoint_files import ExportError, read_torch_file
    from ds_bitter7.state import CheckpointError, load_file

    (tmp_path / "bitter7_rank1.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="bitter7_rank1.pt'?: the file is empty"):
        load_file(str(tmp_path / "bitter7_rank1.pt"))
    with pytest.raises(ExportError, match="bitter7_rank1.pt'?: the file is empty"):
        read_torch_file(str(tmp_path / "bitter7_rank1.pt"))


def test_rank_files_saved_without_crc_are_accepted(tmp_path):
    """torch.serialization.set_crc32_options(False) (faster saves) writes CRC 0 for every record:
    such files load, so the pickle's CRC check must not refuse them; a damaged pickle with a CRC is named."""
    import torch

    from ds_bitter7.checkpoint_files import zero_file_problems

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"optimizer_state_dict": {"step": 1}, "t": torch.ones(3)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert zero_file_problems(str(tmp_path), 1) == []
    torch.save({"optimizer_state_dict": {"step": 1}, "t": torch.ones(3)}, path)
    data = path.read_bytes()
    with open(path, "r+b") as f:  # inside the pickle
        f.seek(data.index(b"optimizer_state_dict"))
        f.write(b"\xff" * 8)
    problems = zero_file_problems(str(tmp_path), 1)
    assert len(problems) == 1 and "is truncated or corrupt (Bad CRC-32" in problems[0], problems


def test_a_model_config_transformers_refuses_to_write_does_not_stop_the_save(tmp_path, caplog):
    """engine.save_checkpoint writes the model's config beside the checkpoints for the export:
    transformers validates a generation config as it saves it, and its refusal stopped the save
    before 'latest' was written."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ds_bitter7.state import save_model_config

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    model.generation_config.temperature = 0.7  # without do_sample: invalid
    with caplog.at_level("WARNING"):
        save_model_config(model, str(tmp_path))
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "generation_config.json").exists()
    assert "not writing the model's GenerationConfig" in caplog.text and "transformers' defaults" in caplog.text
