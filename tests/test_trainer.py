"""Hugging Face Trainer + DeepSpeed + Bitter7Callback on 2 CPU ranks: prunes, saves, resumes, and
keeps the pruner state saved with the weights."""

from __future__ import annotations

import json

import pytest
import torch
from _launch_util import (
    MPIRUN,
    REPO,
    TINY_MODEL,
    VENV_BIN,
    free_port,
    load_without_ds_bitter7,
    mpirun,
    run,
    tiny_ds_config,
    write_corpus,
)


def trainer_command(config, corpus, out, summary, save_steps: int):
    """launch/train_hf_trainer.py on 2 ranks under torchrun (add --max_steps / --resume)."""
    return [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            "launch/train_hf_trainer.py", "--deepspeed", str(config), "--output_dir", str(out),
            "--data", str(corpus), *TINY_MODEL, "--seq_len", "32", "--save_steps", str(save_steps),
            "--summary", str(summary)]


def test_trainer_prunes_saves_and_resumes(tmp_path):
    """With the optimizer and warm-up numbers of ds_configs/cpu_demo.json, which the HF integration
    checks against TrainingArguments; data parallel over both ranks."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    config = tiny_ds_config(tmp_path / "ds.json", bias_compensation=True)
    cfg = json.loads(config.read_text())
    demo = json.loads((REPO / "ds_configs" / "cpu_demo.json").read_text())
    cfg["optimizer"]["params"].update({k: demo["optimizer"]["params"][k] for k in ("betas", "eps", "weight_decay")})
    cfg["scheduler"] = demo["scheduler"]
    config.write_text(json.dumps(cfg))
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    base = trainer_command(config, corpus, out, summary, save_steps=4)
    run(base + ["--max_steps", "8"], tmp_path, timeout=200)
    first = json.loads(summary.read_text())
    assert first["world_size"] == 2  # each rank trains on its share, not the whole data
    kept = [r["units_kept"] for r in first["layers"]]
    assert first["pruning"] and sum(kept) == 128  # 2 layers x 128 neurons, half removed
    for step in (4, 8):
        state = torch.load(out / f"checkpoint-{step}" / "bitter7_state.pt", weights_only=False)
        assert state  # the pruner's state dict, written by rank 0
    run(base + ["--max_steps", "10", "--resume"], tmp_path, timeout=200)
    resumed = json.loads(summary.read_text())
    assert resumed["steps"] == 10
    # the loss at step 10, not step 8's from the first run (logging_steps min(10, max_steps) = 8 at
    # resume: no step of this run was logged)
    assert resumed["train_loss"] is not None and resumed["train_loss"] != first["train_loss"]
    assert [r["units_kept"] for r in resumed["layers"]] == kept
    # an earlier checkpoint's bitter7_state.pt beside the latest one's weights (a run redone from
    # checkpoint-4 and stopped between DeepSpeed's save and the callback's leaves that): the state
    # DeepSpeed saved with the weights wins (the stale file's masks were refused as not matching them)
    latest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    stale = torch.load(out / "checkpoint-4" / "bitter7_state.pt", weights_only=False)
    assert sum(int(m.sum()) for m in stale["masks"].values()) > 128  # fewer units pruned at step 4
    torch.save(stale, latest / "bitter7_state.pt")
    run(base + ["--max_steps", "12", "--resume"], tmp_path, timeout=200)
    assert [r["units_kept"] for r in json.loads(summary.read_text())["layers"]] == kept
    # resumed with the bitter7 section switched off: the state is not read, and that is said
    latest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    off = tmp_path / "off.json"
    off.write_text(json.dumps({**cfg, "bitter7": {**cfg["bitter7"], "enabled": False}}))
    log = run(trainer_command(off, corpus, out, summary, save_steps=4) + ["--max_steps", "14", "--resume"], tmp_path,
              timeout=200)
    assert f"{latest} carries ds_bitter7 pruner state but this run's bitter7 section is disabled" in log, log[-3000:]
    # resumed with another model: named before DeepSpeed's loading failed with a size-mismatch traceback
    other = [json.dumps({"n_layer": 2, "n_embd": 64}) if arg == TINY_MODEL[-1] else arg for arg in base]
    log = run(other + ["--max_steps", "20", "--resume"], tmp_path, timeout=200, fails=True)
    assert "its model (config.json) has n_embd=32 where this run's has 64" in log, log[-3000:]
    # resumed by one process: the conversion named before DeepSpeed's loading (its error named none)
    one = [str(VENV_BIN / "python")] + base[base.index("launch/train_hf_trainer.py"):]
    log = run(one + ["--max_steps", "20", "--resume"], tmp_path, timeout=200, fails=True)
    assert "saved with ZeRO stage 2 by 2 data-parallel ranks, not 1" in log and "ds_to_universal" in log, log[-3000:]


def test_trainer_checkpoints_of_an_export_load_without_ds_bitter7(tmp_path):
    """An export whose blocks differ in width (bitter7_gpt2), trained on with the Trainer: each
    checkpoint keeps the export's auto_map, so it carries the model code too (trust_remote_code
    found no module file in it), and loads in a process without ds_bitter7 with the logits it has
    here. The script refuses a DeepSpeed setting the pruner cannot serve before the data."""
    from test_shrink import logits, random_masks, zero_units
    from transformers import AutoModelForCausalLM

    from ds_bitter7 import modeling
    from ds_bitter7.export import export_model

    model = modeling.build_model("tiny-gpt2", 264, overrides={"n_layer": 2, "n_embd": 32})
    masks = random_masks(model, "global")
    zero_units(model, masks)
    export_model(model, masks, str(tmp_path / "small"))
    config = tiny_ds_config(tmp_path / "ds.json")
    out = tmp_path / "out"
    cmd = [str(VENV_BIN / "python"), "launch/train_hf_trainer.py", "--deepspeed", str(config), "--output_dir", str(out),
           "--data", str(write_corpus(tmp_path / "corpus.jsonl")), "--model", str(tmp_path / "small"),
           "--seq_len", "32", "--max_steps", "2", "--save_steps", "2"]
    bad = tmp_path / "bad.json"
    cfg = json.loads(config.read_text())
    bad.write_text(json.dumps(dict(cfg, zero_optimization=dict(cfg["zero_optimization"], round_robin_gradients=True))))
    log = run([str(bad) if arg == str(config) else arg for arg in cmd], tmp_path, fails=True)
    assert "round_robin_gradients = true: DeepSpeed's fp32 master mapping" in log and "blocks of" not in log, log[-2000:]
    run(cmd, tmp_path, timeout=200)
    assert (out / "checkpoint-2" / "modeling_bitter7_gpt2.py").is_file()
    trained = AutoModelForCausalLM.from_pretrained(str(out / "checkpoint-2")).eval()  # ds_bitter7's classes
    torch.save(logits(trained), tmp_path / "logits.pt")  # the ids load_without_ds_bitter7 uses
    cls, rel = load_without_ds_bitter7(out / "checkpoint-2", tmp_path, tmp_path / "logits.pt")
    assert cls == "Bitter7GPT2LMHeadModel" and rel <= 1e-6, (cls, rel)


def test_trainer_resume_keeps_unstructured_masks(tmp_path):
    """Each rank's unstructured masks live in its rank file of the DeepSpeed checkpoint, which the
    Trainer loads before the callback exists: the callback restores them (they were lost). The
    checkpoint lacks bitter7_state.pt (the Trainer writes it last: a job killed just before): the
    DeepSpeed checkpoint's own copy of the state serves."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    config = tiny_ds_config(tmp_path / "ds.json", structures=["unstructured"])
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    base = trainer_command(config, corpus, out, summary, save_steps=8)
    run(base + ["--max_steps", "8"], tmp_path, timeout=200)
    (out / "checkpoint-8" / "bitter7_state.pt").unlink()
    first = json.loads(summary.read_text())
    kept = sum(r["params_kept"] for r in first["layers"])
    run(base + ["--max_steps", "10", "--resume"], tmp_path, timeout=200)
    resumed = json.loads(summary.read_text())
    assert resumed["steps"] == 10
    # the loss at step 10, not step 8's from the first run (logging_steps min(10, max_steps) = 8 at
    # resume: no step of this run was logged)
    assert resumed["train_loss"] is not None and resumed["train_loss"] != first["train_loss"]
    assert sum(r["params_kept"] for r in resumed["layers"]) == kept < sum(r["params_total"] for r in resumed["layers"])


def test_trainer_under_mpirun(tmp_path):
    """accelerate reads rank, world and address from the environment only: under mpirun the
    script finds them through mpi4py first (every rank stopped on MASTER_ADDR before)."""
    if MPIRUN is None:
        pytest.skip("no mpirun")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    config = tiny_ds_config(tmp_path / "ds.json", bias_compensation=True)
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    command = trainer_command(config, corpus, out, summary, save_steps=6)[5:]  # without torchrun and its flags
    run([*mpirun(2), str(VENV_BIN / "python"), *command, "--max_steps", "6"], tmp_path, timeout=200)
    result = json.loads(summary.read_text())
    assert result["world_size"] == 2 and result["steps"] == 6 and sum(r["units_kept"] for r in result["layers"]) == 128


def test_trainer_default_calibration_leaves_out_a_text_column(tmp_path):
    """One process: the default calibration batches (the first training rows) hold only the model
    inputs; a leftover text column made the Trainer's collator fail. They are built for a score
    that reads activation statistics with compensation off (attach refused the run)."""
    out = run([str(VENV_BIN / "python"), str(REPO / "tests" / "hf_text_column.py"), str(tmp_path / "out")], tmp_path,
              timeout=200)
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    # the schedule starts at sparsity 0 (step 2), then both layers' neurons are pruned, uncompensated
    assert result["events"] == [2, 4] and result["compensated"] == [None, None]
    assert result["sparsity"] == {"mlp_neuron": 0.5}


def test_trainer_script_refuses_bad_arguments_before_any_work(tmp_path, capsys):
    """--seq_len 1 trained on zero gradients and reported loss 0, --max_steps -1 trained three
    epochs, a bad --model_overrides or a --summary folder failed late, an --output_dir with
    another run's checkpoints had them replaced one by one, --resume without a checkpoint failed
    after DeepSpeed's start, and --resume to a step already saved took one more step."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_hf", REPO / "launch" / "train_hf_trainer.py")
    hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf)
    (tmp_path / "used" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "used" / "checkpoint-old-100").mkdir()  # not the Trainer's: its step is not 100
    (tmp_path / "used" / "checkpoint-200").write_text("a file")
    base = ["--deepspeed", str(REPO / "ds_configs" / "cpu_demo.json"), "--output_dir", str(tmp_path / "new")]
    for extra, needle in ((["--seq_len", "1"], "--seq_len must be >= 2, got 1"),
                          (["--max_steps", "-1"], "--max_steps must be >= 1, got -1"),
                          (["--model_overrides", "n_layer=2"], "--model_overrides is not valid JSON")):
        with pytest.raises(SystemExit):
            hf.parse_args(base + extra)
        assert needle in capsys.readouterr().err, extra
    # the paths: on each rank once the ranks have started (a node's disk may differ from the others')
    for extra, needle in ((["--summary", str(tmp_path)], "is a folder: name a file"),
                          (["--output_dir", str(tmp_path / "used")], "already holds checkpoints (checkpoint-4)"),
                          (["--resume"], "holds no checkpoint-N folder to resume from"),
                          (["--data", str(tmp_path / "used"), "--output_dir", str(tmp_path / "used"), "--resume"],
                           "is a --data folder"),
                          (["--output_dir", str(tmp_path / "used"), "--resume", "--max_steps", "4"],
                           "the last checkpoint in --output_dir is at step 4")):
        problems = hf.path_problems(hf.parse_args(base + extra), rank=0)
        assert any(needle in p for p in problems), (extra, problems)
    assert not hf.path_problems(hf.parse_args(base + ["--output_dir", str(tmp_path / "used"), "--resume"]), rank=0)


def test_corrupt_checkpoint_state_at_resume_is_a_checkpoint_error(tmp_path):
    """A model-states file that cannot be read raised the export's ExportError at a Trainer resume."""
    from types import SimpleNamespace

    from ds_bitter7.hf_trainer import Bitter7Callback
    from ds_bitter7.state import MODEL_STATES_FILE, CheckpointError

    (tmp_path / "global_step4").mkdir()
    (tmp_path / "global_step4" / MODEL_STATES_FILE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=f"^cannot read '.*{MODEL_STATES_FILE}'"):
        Bitter7Callback(trainer=None)._read_state(str(tmp_path), "global_step4", SimpleNamespace(global_step=4))


def test_default_calibration_rows_differ_per_rank():
    """The callback's default calibration rows: each rank its own (the statistics are all-reduced,
    so identical rows on every rank counted each one world-size times), together the first rows."""
    from ds_bitter7.hf_trainer import rank_rows

    rows = [rank_rows(range(100), 3, 2, r) for r in range(2)]
    assert rows == [[0, 2, 4], [1, 3, 5]]
    assert rank_rows(range(100), 3, 1, 0) == [0, 1, 2]
    assert rank_rows(range(4), 3, 2, 1) == [1, 3]  # a short dataset: fewer rows, never another rank's


def default_calibration_of(rows: int, compensate=(True, True)):
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from ds_bitter7 import parse_config
    from ds_bitter7.hf_trainer import Bitter7Callback

    trainer = SimpleNamespace(train_dataset=[{"input_ids": torch.arange(4)}] * rows, data_collator=collate_rows,
                              args=SimpleNamespace(per_device_train_batch_size=1))
    cfg = parse_config({"bitter7": {"bias_compensation": {"enabled": compensate[dist.get_rank()], "num_batches": 2}}})
    try:
        return len(Bitter7Callback(trainer)._calibration(SimpleNamespace(device="cpu"), cfg) or [])
    except ValueError as err:
        return str(err)


def collate_rows(rows):
    import torch

    return {"input_ids": torch.stack([r["input_ids"] for r in rows])}


def test_a_training_set_of_fewer_rows_than_ranks_is_named_on_every_rank():
    """Rank 1 got no calibration row: attach refused the "empty container" of calibration_data, an
    argument the user never gave (rank 0: "failed on another rank")."""
    from distributed import run_distributed

    assert run_distributed(default_calibration_of, 2, 4) == [2, 2]
    out = run_distributed(default_calibration_of, 2, 1)
    assert all(o.startswith("the training set has fewer rows than the 2 ranks") for o in out), out
    # a rank whose config takes no default batches still joins the check (it waited in attach's first
    # collective while the others waited in this one)
    assert run_distributed(default_calibration_of, 2, 4, (True, False), timeout=60) == [2, 0]


def test_a_push_uploads_the_model_code_of_an_export(tmp_path):
    """The Trainer's push (transformers 5: ``_push_from_checkpoint`` and ``push_to_hub``) calls
    ``on_push_begin``, then copies config.json and the weights from checkpoint-N into output_dir
    and uploads output_dir, all before ``on_save``: the callback writes a bitter7_* model's code
    there first, so what would be uploaded loads without ds_bitter7 (it lacked the module files)."""
    import shutil
    from types import SimpleNamespace

    from test_shrink import logits, random_masks, zero_units
    from transformers import AutoModelForCausalLM

    from ds_bitter7 import modeling
    from ds_bitter7.export import export_model
    from ds_bitter7.hf_trainer import Bitter7Callback

    model = modeling.build_model("tiny-gpt2", 264, overrides={"n_layer": 2, "n_embd": 32})
    masks = random_masks(model, "global")
    zero_units(model, masks)
    export_model(model, masks, str(tmp_path / "small"))
    small = AutoModelForCausalLM.from_pretrained(str(tmp_path / "small")).eval()
    out = tmp_path / "out"
    small.save_pretrained(str(out / "checkpoint-2"))  # as the Trainer saves it, before the push
    Bitter7Callback(trainer=None).on_push_begin(SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=2),
                                                None, model=small)
    assert (out / "checkpoint-2" / "modeling_bitter7_gpt2.py").is_file()  # hub_strategy checkpoint uploads it too
    for name in ("config.json", "model.safetensors"):  # the Trainer's copy into output_dir
        shutil.copy(out / "checkpoint-2" / name, out / name)
    torch.save(logits(small), tmp_path / "logits.pt")
    cls, rel = load_without_ds_bitter7(out, tmp_path, tmp_path / "logits.pt")
    assert cls == "Bitter7GPT2LMHeadModel" and rel <= 1e-6, (cls, rel)
