"""`python -m ds_bitter7.export` on a real DeepSpeed ZeRO-2 checkpoint, and its error messages."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from _launch_util import load_without_ds_bitter7
from transformers import AutoModelForCausalLM

import ds_bitter7.models  # noqa: F401  (registers bitter7_gpt2 / bitter7_llama)
from ds_bitter7.checkpoint_files import checkpoint_problems
from ds_bitter7.comm import free_port
from ds_bitter7.export import ExportError, export_checkpoint

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# Builds a tiny model, zeroes a global set of units (with random compensation biases), takes one
# ZeRO-2 step at lr 0 and saves a checkpoint whose client state holds the masks, like the pruner.
MAKE_CHECKPOINT = textwrap.dedent("""
    import sys, torch, deepspeed
    from test_shrink import MODELS, random_masks, zero_units
    name, out = sys.argv[1], sys.argv[2]
    model = MODELS[name]()
    masks = random_masks(model, "global")
    zero_units(model, masks)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    counts = {k: m.numel() for k, m in masks.items()}
    state = {"version": 1, "masks": masks, "structures": ["mlp_neuron", "attention_head"],
             "model_type": model.config.model_type, "unit_counts": counts, "step": 1}
    engine.save_checkpoint(out, client_state={"bitter7": state})
    if engine.global_rank == 0:
        model.config.save_pretrained(out)
        torch.save({"ids": ids, "logits": reference}, out + "/reference.pt")
""")


# bf16 training, two steps that move the fp32 masters off the bf16 grid; DeepSpeed's own reading of
# them is saved beside. argv[1] "bf16_optimizer": DeepSpeed's BF16_Optimizer (fp32 gradient
# accumulation, ZeRO-1); "zero2": its ZeRO-2 optimizer, whose rank files carry the same
# bf16_zero_pp_rank_* names but another layout.
MAKE_BF16_CHECKPOINT = textwrap.dedent("""
    import sys, torch, deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from test_shrink import tiny_gpt2
    kind, out = sys.argv[1:]
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
              "data_types": {"grad_accum_dtype": "fp32"}, "zero_allow_untested_optimizer": True}
    if kind == "zero2":
        config.update(zero_optimization={"stage": 2}, data_types={})
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    expected = {"bf16_optimizer": "BF16_Optimizer", "zero2": "DeepSpeedZeroOptimizer"}[kind]
    assert type(engine.optimizer).__name__ == expected, type(engine.optimizer)
    for step in range(2):
        ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(step))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    masters = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}  # collective
    engine.save_checkpoint(out)
    if engine.global_rank == 0:
        torch.save(masters, out + "/masters.pt")
""")


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")])
    return env


def make_checkpoint(folder, name: str, world_size: int, script_text: str = MAKE_CHECKPOINT) -> str:
    script = folder / "make_checkpoint.py"
    script.write_text(script_text)
    out = str(folder / "ckpt")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
           f"--master_port={free_port()}", str(script), *([name] if name else []), out]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("gpt2"), "gpt2", world_size=2)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama_extra_bias", world_size=1)


def assert_logits_match(export_dir: str, checkpoint: str) -> None:
    reference = torch.load(os.path.join(checkpoint, "reference.pt"))
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=reference["ids"]).logits
    rel = ((logits - reference["logits"]).norm() / reference["logits"].norm()).item()
    assert rel <= 1e-5, rel


def test_cli_exports_a_2_rank_zero2_checkpoint(gpt2_checkpoint, tmp_path):
    shards = [f for f in os.listdir(os.path.join(gpt2_checkpoint, "global_step1")) if f.endswith("optim_states.pt")]
    assert len(shards) == 2  # really partitioned: consolidation goes through zero_to_fp32
    out = tmp_path / "small"
    cmd = [sys.executable, "-m", "ds_bitter7.export", gpt2_checkpoint, str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_logits_match(str(out), gpt2_checkpoint)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["model_type_out"] == "bitter7_gpt2" and report["tag"] == "global_step1"
    assert report["params_after"] < report["params_before"]
    assert len(report["layers"]) == 2 * 3
    assert "| layer | kind |" in (out / "pruning_report.md").read_text()
    assert (out / "model.safetensors").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".small")]  # temp folder renamed away


def test_llama_compensation_bias_survives_export(llama_checkpoint, tmp_path):
    from test_shrink import tiny_llama

    report = export_checkpoint(llama_checkpoint, str(tmp_path / "small"))
    assert report["model_type_out"] == "bitter7_llama"
    # the model before pruning: without the compensation biases the pruner added (they were counted)
    assert report["params_before"] == sum(p.numel() for p in tiny_llama().parameters())
    assert_logits_match(str(tmp_path / "small"), llama_checkpoint)


def test_existing_output_needs_overwrite(gpt2_checkpoint, tmp_path):
    (tmp_path / "small").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(gpt2_checkpoint, str(tmp_path / "small"))
    export_checkpoint(gpt2_checkpoint, str(tmp_path / "small"), overwrite=True)  # an empty folder
    export_checkpoint(gpt2_checkpoint, str(tmp_path / "small"), overwrite=True)  # a previous export
    assert (tmp_path / "small" / "config.json").is_file()
    mask = os.umask(0)
    os.umask(mask)  # the export is readable as the umask allows, not private to its owner
    assert stat.S_IMODE(os.stat(tmp_path / "small").st_mode) == 0o777 & ~mask
    for name in ("model.safetensors", "config.json", "pruning_report.json"):  # safetensors made the weights 0600
        assert stat.S_IMODE(os.stat(tmp_path / "small" / name).st_mode) == 0o666 & ~mask, name



def test_a_failed_rename_puts_the_previous_export_back(gpt2_checkpoint, tmp_path, monkeypatch):
    """--overwrite moves the previous export aside, then renames the new one into place: a failure
    there left the previous one in a hidden folder."""
    import ds_bitter7.export as export

    export_checkpoint(gpt2_checkpoint, str(tmp_path / "small"))
    before = sorted(os.listdir(tmp_path / "small"))
    rename = os.rename

    def failing(src, dst):
        if ".tmp-" in os.path.basename(src):
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(export.os, "rename", failing)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(gpt2_checkpoint, str(tmp_path / "small"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "small")) == before
    assert sorted(os.listdir(tmp_path)) == ["small"]  # nothing hidden left beside it

    def both_failing(src, dst):  # and when putting it back fails too, the error says where it is
        if ".tmp-" in os.path.basename(src) or ".old-" in os.path.basename(src):
            raise OSError(13, "Permission denied")
        rename(src, dst)

    monkeypatch.setattr(export.os, "rename", both_failing)
    with pytest.raises(OSError, match="nor put the previous export back") as err:
        export_checkpoint(gpt2_checkpoint, str(tmp_path / "small"), overwrite=True)
    hidden = str(err.value).rsplit("it is in ", 1)[1].strip("'")
    assert sorted(os.listdir(hidden)) == before


def test_overwrite_never_deletes_what_is_not_an_export(gpt2_checkpoint, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(gpt2_checkpoint, runs / "ckpt")
    (runs / "notes.txt").write_text("important")
    with pytest.raises(ExportError, match="would delete .*ckpt.*inside output directory"):
        export_checkpoint(str(runs / "ckpt"), str(runs), overwrite=True)  # the checkpoint's parent
    with pytest.raises(ExportError, match="would delete"):
        export_checkpoint(str(runs / "ckpt"), str(runs / "ckpt"), overwrite=True)  # the checkpoint itself
    (runs / "other").mkdir()
    (runs / "other" / "notes.txt").write_text("important")
    with pytest.raises(ExportError, match="replaces only an empty folder or a previous export.*notes.txt"):
        export_checkpoint(str(runs / "ckpt"), str(runs / "other"), overwrite=True)
    assert (runs / "notes.txt").read_text() == "important" and (runs / "other" / "notes.txt").is_file()
    assert (runs / "ckpt" / "latest").is_file()


def test_empty_latest_file_is_named(gpt2_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, ckpt)
    (ckpt / "latest").write_text("")
    with pytest.raises(ExportError, match="latest' is empty"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"))


def test_truncated_optimizer_shard_is_named(gpt2_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, ckpt)
    shard = ckpt / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ExportError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt' is truncated or corrupt"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"))
    shard.unlink()  # a missing rank: named with the saved world size
    with pytest.raises(ExportError, match=r"saved by 2 data-parallel ranks: rank\(s\) \[1\] missing"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"))


def test_resuming_at_another_world_size_says_how_to_convert(gpt2_checkpoint):
    assert checkpoint_problems(gpt2_checkpoint, world_size=2) == []
    problems = checkpoint_problems(gpt2_checkpoint, world_size=1)
    assert len(problems) == 1 and "saved with ZeRO stage 2 by 2 data-parallel ranks, not 1" in problems[0]
    assert "python -m deepspeed.checkpoint.ds_to_universal --input_folder" in problems[0]


def test_checkpoint_without_its_zero_files(gpt2_checkpoint, tmp_path, caplog):
    """Every *optim_states.pt of a ZeRO-2 checkpoint gone: resuming needs them (a problem naming
    the stage and ranks); export falls back to the module weights, with a warning saying so."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, ckpt)
    for shard in (ckpt / "global_step1").glob("*optim_states.pt"):
        shard.unlink()
    problems = checkpoint_problems(str(ckpt))
    assert len(problems) == 1 and "holds no *optim_states.pt, but was saved with ZeRO stage 2 by 2" in problems[0]
    states = ckpt / "global_step1" / "mp_rank_00_model_states.pt"
    with caplog.at_level("WARNING", logger="ds_bitter7.export"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"))
        assert "not the fp32 master weights" not in caplog.text  # fp32 training: they are the masters
        assert_logits_match(str(tmp_path / "out"), str(ckpt))
        saved = torch.load(states, weights_only=False)
        saved["module"] = {k: v.bfloat16() for k, v in saved["module"].items()}  # as bf16 training saves it
        torch.save(saved, states)
        export_checkpoint(str(ckpt), str(tmp_path / "out_bf16"))
    assert "exporting the bfloat16 module weights of mp_rank_00_model_states.pt, not the fp32 master" in caplog.text
    states.unlink()
    assert checkpoint_problems(str(ckpt)) == [f"{str(ckpt / 'global_step1')!r} has no mp_rank_00_model_states.pt "
                                              "(an incomplete copy?)"]


@pytest.mark.parametrize("kind, world_size", [("bf16_optimizer", 2), ("zero2", 3)])
def test_bf16_checkpoint_exports_its_fp32_masters(tmp_path, caplog, kind, world_size):
    """zero_to_fp32 refuses the BF16_Optimizer's rank files ('not a zero checkpoint'): the export
    took the bf16 module weights instead, under a warning that called it no ZeRO checkpoint. The
    bf16 ZeRO-2 files have the same names: read as the BF16_Optimizer's, any padding of a param group
    (3 ranks here) failed the export."""
    from ds_bitter7.checkpoint_files import consolidate

    ckpt = make_checkpoint(tmp_path, kind, world_size=world_size, script_text=MAKE_BF16_CHECKPOINT)
    masters = torch.load(os.path.join(ckpt, "masters.pt"))
    with caplog.at_level("WARNING", logger="ds_bitter7.export"):
        weights = consolidate(ckpt, "global_step2")
    assert caplog.text == ""
    assert set(weights) >= set(masters) and any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())
    for name, master in masters.items():
        assert torch.equal(weights[name], master), name
    assert torch.equal(weights["lm_head.weight"], masters["transformer.wte.weight"])  # tied


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="'.*afile' is a file: name the folder given to save_checkpoint"):
        export_checkpoint(str(tmp_path / "afile"), str(tmp_path / "out"))


def test_missing_latest_tag(tmp_path):
    for tag in ("global_step1", "global_step2"):
        (tmp_path / "ckpt" / tag).mkdir(parents=True)
    with pytest.raises(ExportError, match="no 'latest' file at .*latest"):
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    (tmp_path / "ckpt" / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"")
    for tag in ("", ".", "global_step2/..", "../ckpt", str(tmp_path)):  # the folder itself: "no pruner state" in
        # it, naming no tag; or one outside it
        with pytest.raises(ExportError, match=f"tag {re.escape(repr(tag))} names no tag folder inside .*: pass a tag "
                           "such as global_step2$"):
            export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), tag=tag)
    from ds_bitter7.checkpoint_files import resolve_tag

    for tag in ("global_step2/", str(tmp_path / "ckpt" / "global_step2")):  # an absolute tag inside it too
        assert resolve_tag(str(tmp_path / "ckpt"), tag) == "global_step2"


def test_trainer_checkpoint_saved_without_deepspeed_files(gpt2_checkpoint, tmp_path):
    """A Trainer checkpoint saved with save_only_model=True holds the weights (model.safetensors),
    config.json and bitter7_state.pt, no DeepSpeed checkpoint: those are exported; a Trainer
    output_dir given instead of one of its checkpoint folders is named as such."""
    from safetensors.torch import save_file

    from ds_bitter7.checkpoint_files import consolidate, load_pruner_state

    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    shutil.copy(os.path.join(gpt2_checkpoint, "config.json"), folder)
    weights = consolidate(gpt2_checkpoint, "global_step1")
    save_file({k: v.clone().contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    torch.save(load_pruner_state(gpt2_checkpoint, "global_step1")[0], folder / "bitter7_state.pt")
    report = export_checkpoint(str(folder), str(tmp_path / "small"))
    assert report["tag"] is None and report["params_after"] < report["params_before"]
    assert_logits_match(str(tmp_path / "small"), gpt2_checkpoint)
    (tmp_path / "checkpoint-12").mkdir()
    with pytest.raises(ExportError, match=r"a Trainer output_dir: pass one of its checkpoint folders "
                                          r"\(checkpoint-1, checkpoint-12\)"):
        export_checkpoint(str(tmp_path), str(tmp_path / "out"))
    (folder / "bitter7_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ExportError, match="cannot read .*bitter7_state.pt"):
        export_checkpoint(str(folder), str(tmp_path / "out"))
    (folder / "bitter7_state.pt").unlink()  # the run died between the Trainer's save and the callback's
    with pytest.raises(ExportError, match=r"holds model weights \(model.safetensors\) but no bitter7_state.pt"):
        export_checkpoint(str(folder), str(tmp_path / "out"))  # was: 'pass --tag', and there is no tag
    (folder / "pruning_report.json").write_text("{}")  # an export given for a checkpoint: not a Trainer's
    with pytest.raises(ExportError, match=r"it is an export \(pruning_report.json\): pruned already"):
        export_checkpoint(str(folder), str(tmp_path / "out"))
    (folder / "pruning_report.json").unlink()
    # a tag folder given for its parent: --tag did not help (it looked for global_step1/global_step1)
    tag_dir = os.path.join(gpt2_checkpoint, "global_step1")
    with pytest.raises(ExportError, match=r"it holds mp_rank_00_model_states.pt, so it is a tag folder itself: pass "
                                          rf"the folder above it \('{gpt2_checkpoint}'\), with --tag global_step1"):
        export_checkpoint(tag_dir, str(tmp_path / "out"))
    with pytest.raises(ExportError, match=r"global_step1/global_step1' does not exist; it holds mp_rank_00_model_states"):
        export_checkpoint(tag_dir, str(tmp_path / "out"), tag="global_step1")  # --tag does not help


def test_missing_pruner_state(gpt2_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, ckpt)
    states = ckpt / "global_step1" / "mp_rank_00_model_states.pt"
    data = torch.load(states, weights_only=False)
    del data["bitter7"]
    torch.save(data, states)
    with pytest.raises(ExportError, match="mp_rank_00_model_states.pt' has no 'bitter7' client state"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"))


def _set_client_state(ckpt, value) -> None:
    states = ckpt / "global_step1" / "mp_rank_00_model_states.pt"
    data = torch.load(states, weights_only=False)
    data["bitter7"] = value
    torch.save(data, states)


def test_corrupt_pruner_state(gpt2_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, ckpt)
    _set_client_state(ckpt, "not a state")
    with pytest.raises(ExportError, match="mp_rank_00_model_states.pt' is corrupt: expected a dict"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"))


def test_stale_trainer_state_file_loses_to_the_checkpoints_own(gpt2_checkpoint, tmp_path):
    """The Trainer callback writes bitter7_state.pt after DeepSpeed's checkpoint: a run redone from
    an earlier checkpoint and stopped in between leaves an earlier run's file beside the new
    weights. The state saved with the weights wins (the stale one exported live neurons removed)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, ckpt)
    state = torch.load(ckpt / "global_step1" / "mp_rank_00_model_states.pt", weights_only=False)["bitter7"]
    stale = {**state, "masks": {k: ~m for k, m in state["masks"].items()}}  # other units pruned
    torch.save(stale, ckpt / "bitter7_state.pt")
    export_checkpoint(str(ckpt), str(tmp_path / "out"))
    assert_logits_match(str(tmp_path / "out"), gpt2_checkpoint)


def test_masks_that_do_not_match_the_model(gpt2_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, ckpt)
    masks = {"layers.0.mlp": torch.ones(10, dtype=torch.bool), "layers.7.attn": torch.ones(4, dtype=torch.bool)}
    _set_client_state(ckpt, {"version": 1, "masks": masks})
    with pytest.raises(ExportError, match=r"model_states.pt.*has 10 units; the model has 64.*unknown key"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"))


def test_missing_model_config(gpt2_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, ckpt)
    os.remove(ckpt / "config.json")
    with pytest.raises(ExportError, match="config.json' does not exist.*--model_config"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"))


def test_reports_are_strict_json():
    """An event that pruned nothing has a nan threshold: the JSON report says null, not NaN."""
    from ds_bitter7.export import json_safe

    report = json_safe({"thresholds": {"mlp_neuron": float("nan")}, "x": [float("inf"), 1.5], "n": 3})
    assert json.loads(json.dumps(report, allow_nan=False)) == {"thresholds": {"mlp_neuron": None},
                                                               "x": [None, 1.5], "n": 3}


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "mistral_window"])
def test_bitter7_types_load_with_trust_remote_code_alone(name, tmp_path):
    """The export carries its model code and auto_map: a process that never imports ds_bitter7 loads
    it with trust_remote_code=True and gets the same logits."""
    from test_shrink import MODELS, logits, random_masks, tiny_llama_like, zero_units

    from ds_bitter7.export import export_model

    model = tiny_llama_like("mistral") if name == "mistral_window" else MODELS[name]()
    if name == "mistral_window":
        model.config.sliding_window = 4
    masks = random_masks(model, "global")
    zero_units(model, masks)
    export_model(model, masks, str(tmp_path / "small"))
    torch.save(logits(model), tmp_path / "expected.pt")
    cls, rel = load_without_ds_bitter7(tmp_path / "small", tmp_path, tmp_path / "expected.pt")
    assert cls.startswith("Bitter7") and rel <= 1e-5, (cls, rel)


def test_overwrite_resolves_links(tmp_path):
    """A tag folder linked into the output folder is being read too; a linked output is refused."""
    from ds_bitter7.export import check_output_dir

    (tmp_path / "old" / "real_step").mkdir(parents=True)
    (tmp_path / "old" / "pruning_report.json").write_text("{}")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "global_step1").symlink_to(tmp_path / "old" / "real_step")
    with pytest.raises(ExportError, match="would delete .*global_step1"):
        check_output_dir(str(tmp_path / "old"), True, [str(tmp_path / "ckpt")])
    (tmp_path / "link").symlink_to(tmp_path / "old")
    with pytest.raises(ExportError, match="is a symbolic link"):
        check_output_dir(str(tmp_path / "link"), True, [])
    check_output_dir(str(tmp_path / "old"), True, [str(tmp_path / "elsewhere")])  # a previous export: replaced
    (tmp_path / "ckpt" / "exported").mkdir()
    (tmp_path / "ckpt" / "exported" / "pruning_report.json").write_text("{}")
    check_output_dir(str(tmp_path / "ckpt" / "exported"), True, [str(tmp_path / "ckpt")])  # beside the tags: not read


def test_output_under_a_file_and_unreadable_configs_are_named(tmp_path):
    """Checked before any work, with one line naming the path (not a traceback after consolidation)."""
    from ds_bitter7.export import check_output_dir, load_config, load_generation_config

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="afile' is a file, not a folder"):
        check_output_dir(str(tmp_path / "afile" / "sub" / "out"), False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="config.json' cannot be read by transformers"):
        load_config(str(tmp_path / "bad"))
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "nosuchmodel"}')
    with pytest.raises(ExportError, match="cannot be read by transformers: .*nosuchmodel"):
        load_config(str(tmp_path / "bad"))
    assert load_generation_config(str(tmp_path / "bad")) is None  # none saved: the model's own
    (tmp_path / "bad" / "generation_config.json").write_text("{not json")
    with pytest.raises(ExportError, match="generation_config.json' cannot be read by transformers"):
        load_generation_config(str(tmp_path / "bad"))


def test_tokenizer_files_and_chat_template_travel_with_the_export(tmp_path):
    from test_shrink import MODELS, random_masks, zero_units

    from ds_bitter7.export import export_model

    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja", "added_tokens.json"):
        (src / name).write_text("{}" if name.endswith(".json") else "{{ messages }}")
    model = MODELS["gpt2"]()
    masks = random_masks(model, "per_layer")
    zero_units(model, masks)
    export_model(model, masks, str(tmp_path / "out"), copy_from=str(src))
    for name in ("tokenizer.json", "chat_template.jinja", "added_tokens.json"):
        assert (tmp_path / "out" / name).read_text() == (src / name).read_text(), name


def test_the_generation_config_travels_with_the_export(tmp_path):
    """A chat model's stop tokens and sampling defaults: the shrunk model was built from its config
    alone, so generate() stopped on other tokens and decoded greedily."""
    from test_shrink import MODELS, random_masks, zero_units
    from transformers import GenerationConfig

    from ds_bitter7.export import export_model

    model = MODELS["llama_gqa"]()
    model.generation_config.eos_token_id, model.generation_config.do_sample = [0, 7], True
    model.generation_config.temperature = 0.6
    masks = random_masks(model, "global")
    zero_units(model, masks)
    export_model(model, masks, str(tmp_path / "out"))
    saved = GenerationConfig.from_pretrained(str(tmp_path / "out"))
    assert (saved.eos_token_id, saved.do_sample, saved.temperature) == ([0, 7], True, 0.6)


def test_model_config_with_other_shapes_is_named(gpt2_checkpoint, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gpt2_checkpoint)
    config.n_inner = 2 * (config.n_inner or 4 * config.n_embd)  # same names, wider MLPs
    config.save_pretrained(str(tmp_path / "cfg"))
    with pytest.raises(ExportError, match="do not fit the gpt2 config .*size mismatch.*pass the training run"):
        export_checkpoint(gpt2_checkpoint, str(tmp_path / "out"), model_config=str(tmp_path / "cfg"))


def test_an_output_location_that_cannot_be_written_is_named_before_the_work(tmp_path, monkeypatch):
    """A folder the user may not write in (or a read-only file system: os.access says so for root
    too) failed in tempfile.mkdtemp after the weights were consolidated, and one-shot's --report
    after the export was written; a mount point given to --overwrite failed at the rename."""
    from ds_bitter7 import oneshot_args
    from ds_bitter7.export import check_output_dir

    locked = os.path.realpath(tmp_path / "locked")
    os.makedirs(locked)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.path.realpath(path) == locked
                        else access(path, mode))
    for inside in ("model", os.path.join("out", "model")):  # its parent, or the nearest that exists
        with pytest.raises(ExportError, match="cannot be written: no permission to write in .*locked'"):
            check_output_dir(os.path.join(locked, inside), False)
    args = oneshot_args.parse_args([str(tmp_path / "ckpt"), str(tmp_path / "o"), "--sparsity", "0.5",
                               "--report", os.path.join(locked, "r.json")])
    assert oneshot_args.report_problems(args) == [f"--report {args.report!r}: no permission to write in {locked!r}"]
    (tmp_path / "r.json").write_text("{}")  # an existing report is written in place: its folder's permission is no matter
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.path.realpath(path) == str(tmp_path.resolve())
                        else access(path, mode))
    args.report, args.overwrite = str(tmp_path / "r.json"), True
    assert oneshot_args.report_problems(args) == []
    monkeypatch.setattr(os, "access", access)
    check_output_dir(str(tmp_path / "out"), False)  # beside it: fine
    ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: path == str(tmp_path / "mnt") or ismount(path))
    with pytest.raises(ExportError, match="is a mount point, which --overwrite cannot replace"):
        check_output_dir(str(tmp_path / "mnt"), True)
