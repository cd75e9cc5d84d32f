"""One-shot pruning of a plain DeepSpeed checkpoint, on emulated ranks.

- A ZeRO-2 checkpoint written by plain DeepSpeed at 2 ranks is pruned at 2 ranks (same world
  size) and at 1 rank (universal checkpoint conversion): the same units go, the perplexity before
  and after is reported, and the exported model is smaller and loads with transformers.
- Bad arguments fail on every rank with one message: sparsity outside [0, 1), unknown data paths,
  and a checkpoint without optimizer state for a score that needs it (naming magnitude).
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ds_bitter7 import checkpoint_loading, oneshot, oneshot_args
from ds_bitter7.state import MODEL_STATES_FILE

TEXT = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}." for i in range(400))


def _model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=264, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=256,
                                      eos_token_id=256))


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=264,
                                        max_position_embeddings=64, bos_token_id=256, eos_token_id=256))


UNSTRUCTURED = {"structures": ["unstructured"], "score": "bitter7", "target_sparsity": 0.5,
                "schedule": {"start_step": 1, "end_step": 3, "frequency": 1}}  # half of the block matrices


def make_checkpoint(folder: str, llama: bool = False, bf16: bool = False, bitter7: Optional[dict] = None,
                    frozen: Sequence[str] = ()) -> None:
    """Plain DeepSpeed ZeRO-2 training for 3 steps, then save (no ds_bitter7 involved; with
    ``bitter7``, ds_bitter7 training with that section). The LLaMA one (no biases) has weight-decay
    and no-decay parameter groups, as HF Trainer makes them. ``frozen``: the parameters whose names
    start so are frozen (not given to the optimizer), as in a fine-tuning that trains part of a model."""
    import deepspeed

    import ds_bitter7

    model = _llama() if llama else _model()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(tuple(frozen)))
    params = [p for p in model.parameters() if p.requires_grad]
    if llama:
        decay = [p for n, p in model.named_parameters() if p.dim() > 1]
        params = [{"params": decay, "weight_decay": 0.1},
                  {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if bitter7 is not None:
        cfg["bitter7"] = bitter7
    engine, *_ = (ds_bitter7 if bitter7 is not None else deepspeed).initialize(model=model, model_parameters=params,
                                                                               config=cfg)
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(3):
        ids = torch.randint(0, 257, (2, 32), generator=g)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.save_checkpoint(folder, tag="global_step3")
    if dist.get_rank() == 0 and bitter7 is None:  # ds_bitter7's save writes it (the README's training loop)
        model.config.save_pretrained(folder)


def run_oneshot(argv):
    try:
        return oneshot.run(oneshot_args.parse_args(argv))
    except oneshot.OneShotError as err:
        return f"OneShotError: {err}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("oneshot")
    ckpt = str(root / "ckpt")
    run_distributed(make_checkpoint, 2, ckpt, timeout=120)
    text = root / "corpus.txt"
    text.write_text(TEXT)
    return root, ckpt, str(text)


def _argv(root, ckpt, text, out, *extra):
    return [ckpt, str(root / out), "--sparsity", "0.5", "--calibration", text, "--validation", text,
            "--seq_len", "32", "--batch_size", "2", "--num_batches", "2", "--eval_batches", "2", *extra]


def test_two_ranks_prune_compensate_and_export(checkpoint):
    root, ckpt, text = checkpoint
    out = run_distributed(run_oneshot, 2, _argv(root, ckpt, text, "out2", "--compensation", "least_squares",
                                                "--score", "bitter7"), timeout=150)
    assert out[0]["event"]["thresholds"] == out[1]["event"]["thresholds"]
    s = out[0]
    assert s["event"]["sparsity"] == {"mlp_neuron": 0.5}
    assert s["event"]["compensation"]["mode"] == "least_squares"
    assert s["ppl_before"] > 1 and torch.isfinite(torch.tensor(s["ppl_after"]))
    assert s["params_after"] < s["params_before"]
    small = AutoModelForCausalLM.from_pretrained(str(root / "out2"))
    assert sum(p.numel() for p in small.parameters()) == s["params_after"]


def run_oneshot_per_rank(argvs):
    return run_oneshot(argvs[dist.get_rank()])


def test_ranks_that_find_different_tokenizers_stop_together(checkpoint, tmp_path):
    """A node without the tokenizer files beside config.json tokenized bytes while the others used
    the files (their statistics mixed), and a tokenizer that failed on one rank left the others in
    the next collective (gloo's 'Connection closed by peer')."""
    root, ckpt, text = checkpoint
    argvs = [_argv(root, ckpt, text, str(tmp_path / "out"), "--tokenizer", t) for t in ("bytes", str(tmp_path / "no"))]
    out = run_distributed(run_oneshot_per_rank, 2, argvs, timeout=90)
    assert all(o.startswith("OneShotError: the ranks find different tokenizers") for o in out), out
    assert "(this rank: bytes)" in out[0] and "/no)" in out[1]
    assert not os.path.exists(tmp_path / "out")


def test_other_world_size_goes_through_universal_checkpoint(checkpoint):
    root, ckpt, text = checkpoint
    same = ("--compensation", "none", "--score", "bitter7")  # optimizer-state scores: no data dependence
    one = run_distributed(run_oneshot, 1, _argv(root, ckpt, text, "out1", *same), timeout=150)[0]
    two = run_distributed(run_oneshot, 2, _argv(root, ckpt, text, "out2b", *same), timeout=150)[0]
    assert isinstance(one, dict), one
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["event"]["thresholds"]["mlp_neuron"] == pytest.approx(two["event"]["thresholds"]["mlp_neuron"], rel=1e-9)
    assert one["ppl_before"] == pytest.approx(two["ppl_before"], rel=0.2)  # different shares of the data
    assert not os.path.exists(str(root / "out1") + ".universal_tmp")


def test_plain_llama_with_parameter_groups_gets_least_squares_by_default(checkpoint, tmp_path):
    """No bias on down_proj (added after loading: no step, no optimizer state) and two optimizer
    groups (rebuilt from the checkpoint, or ZeRO-2's partitions would not load at the same world size)."""
    import ds_bitter7  # noqa: F401  registers bitter7_llama

    root, _, text = checkpoint
    ckpt = str(tmp_path / "llama")
    run_distributed(make_checkpoint, 2, ckpt, True, timeout=120)
    out = run_distributed(run_oneshot, 2, _argv(tmp_path, ckpt, text, "small"), timeout=150)[0]
    assert isinstance(out, dict), out
    assert out["compensation"] == "least_squares" and out["event"]["compensation"]["mode"] == "least_squares"
    small = AutoModelForCausalLM.from_pretrained(str(tmp_path / "small"))
    assert small.model.layers[0].mlp.down_proj.bias is not None  # the refit intercept
    assert sum(p.numel() for p in small.parameters()) == out["params_after"]
    assert out["params_before"] == sum(p.numel() for p in _llama().parameters())  # not the biases one-shot added


def test_checkpoint_with_frozen_parameters_loads_at_any_world_size(checkpoint, tmp_path):
    """A parameter frozen in training is in no optimizer group: rebuilt with every parameter, the
    ZeRO partitions did not match the saved ones ('is one of its files corrupt?'), and DeepSpeed's
    universal loading (another world size) does not restore its weights. At sparsity 0 the export
    is the checkpoint's weights exactly. Units with a frozen parameter (layer 1's MLP) cannot be
    pruned: named before the load, with the structure type that can (was a traceback after it)."""
    from ds_bitter7.checkpoint_files import consolidate

    root, _, text = checkpoint
    ckpt = str(tmp_path / "frozen")
    run_distributed(make_checkpoint, 2, ckpt, False, False, None, ("transformer.wpe.", "transformer.h.1.mlp."),
                    timeout=120)
    saved = consolidate(ckpt, "global_step3")
    out = run_distributed(run_oneshot, 1, [ckpt, str(tmp_path / "neurons"), "--sparsity", "0.5", "--score", "obs",
                                           "--calibration", text])[0]
    assert out.startswith("OneShotError: transformer.h.1.mlp.c_fc.bias (and 2 more) was frozen in training") and \
        out.endswith("pass --structures attention_head"), out
    for world in (2, 1):
        out = run_distributed(run_oneshot, world, [ckpt, str(tmp_path / f"out{world}"), "--sparsity", "0",
                                                   "--score", "magnitude", "--compensation", "none",
                                                   "--structures", "attention_head", "--calibration", text],
                              timeout=150)[0]
        assert isinstance(out, dict), out
        small = AutoModelForCausalLM.from_pretrained(str(tmp_path / f"out{world}")).state_dict()
        for name, value in saved.items():
            assert torch.equal(small[name], value), (world, name)


def test_validation_shares_count_every_block_once(tmp_path):
    """A DistributedSampler padded the ranks' shares with repeated blocks: some counted twice, and
    the perplexity moved with the world size."""
    from ds_bitter7 import data as dsdata

    (tmp_path / "v.txt").write_text(TEXT[:2000])
    args = oneshot_args.parse_args([str(tmp_path), "o", "--sparsity", "0.5", "--validation", str(tmp_path / "v.txt"),
                               "--seq_len", "32", "--batch_size", "4"])
    tokenizer = dsdata.get_tokenizer("bytes")
    whole = torch.cat([b["input_ids"] for b in oneshot.validation_loader(args, tokenizer, 1, 0)])
    shares = [torch.cat([b["input_ids"] for b in oneshot.validation_loader(args, tokenizer, 3, r)]) for r in range(3)]
    assert len(whole) % 3 != 0 and sum(len(s) for s in shares) == len(whole)
    assert sorted(map(tuple, torch.cat(shares).tolist())) == sorted(map(tuple, whole.tolist()))


def test_unwritten_compensation_biases_are_dropped_before_export():
    """LLaMA: the zero biases prepare_model adds for compensation, none written (--sparsity 0),
    made the export a bigger model of another layout (mlp_bias / attention_bias)."""
    import ds_bitter7

    model = _llama()
    cfg = ds_bitter7.parse_config({"bitter7": {"structures": ["mlp_neuron"], "bias_compensation": {"enabled": True}}})
    added = ds_bitter7.prepare_model(model, cfg)
    assert added == ["model.layers.0.mlp.down_proj.bias", "model.layers.1.mlp.down_proj.bias"]
    oneshot.drop_unwritten_biases(model, added)
    assert model.model.layers[0].mlp.down_proj.bias is None
    added = ds_bitter7.prepare_model(model, cfg)
    with torch.no_grad():
        model.get_parameter(added[1]).add_(1.0)  # one layer compensated: every added bias stays
    oneshot.drop_unwritten_biases(model, added)
    assert model.model.layers[0].mlp.down_proj.bias is not None


def test_overwrite_refuses_a_folder_holding_the_checkpoint(checkpoint, tmp_path):
    root, ckpt, text = checkpoint
    import shutil

    shutil.copytree(ckpt, tmp_path / "ckpt")
    argv = _argv(tmp_path, str(tmp_path / "ckpt"), text, ".", "--overwrite")
    msg = run_distributed(run_oneshot, 1, argv, timeout=60)[0]
    assert msg.startswith("OneShotError") and "would delete" in msg, msg
    assert (tmp_path / "ckpt" / "latest").is_file()


def test_unreadable_or_short_data_fails_every_rank(checkpoint, tmp_path):
    root, ckpt, text = checkpoint
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("just a few words, one block of 32 bytes at most")
    for data, expect in (("empty.txt", "cannot read --calibration"), ("short.txt", "cannot read --calibration")):
        argv = [ckpt, str(tmp_path / "out"), "--sparsity", "0.5", "--calibration", str(tmp_path / data),
                "--seq_len", "32", "--batch_size", "2", "--num_batches", "2"]
        out = run_distributed(run_oneshot, 2, argv, timeout=90)
        assert out[0].startswith("OneShotError") and expect in out[0], out[0]
        assert out[1].startswith("OneShotError"), out[1]


def test_structures_must_include_those_pruned_in_training(tmp_path):
    info = oneshot.CheckpointInfo("t", str(tmp_path), [], True, {}, {}, {"structures": ["mlp_neuron"]})
    args = oneshot_args.parse_args([str(tmp_path), "o", "--sparsity", "0.5", "--structures", "attention_head"])
    with pytest.raises(oneshot.OneShotError, match="pass --structures mlp_neuron attention_head"):
        oneshot_args.check_args(args, info)
    # with the pruner config's own refusal in the same error, not one after the other
    args.scope = "standardized"  # the default score bitter7_obs is a greedy order
    with pytest.raises(oneshot.OneShotError, match="(?s)pass --structures mlp_neuron attention_head.*"
                       "standardizing ranks per layer is meaningless"):
        oneshot_args.check_args(args, info)


def test_every_input_problem_is_named_at_once(tmp_path):
    """An unreadable checkpoint does not hide the argument errors, nor they the model config's."""
    args = oneshot_args.parse_args([str(tmp_path / "ck"), str(tmp_path / "o"), "--sparsity", "1.5",
                               "--calibration", str(tmp_path / "nope.txt")])
    with pytest.raises(oneshot.OneShotError) as err:
        oneshot_args.check_inputs(args)
    for part in ("checkpoint directory", "does not exist", "--sparsity must be in [0, 1)", "nope.txt']: not found"):
        assert part in str(err.value), str(err.value)
    assert "no model config" not in str(err.value)  # in a folder that does not exist: nothing to add
    (tmp_path / "ck").mkdir()  # a folder without a checkpoint or config.json: both said
    with pytest.raises(oneshot.OneShotError, match="(?s)--sparsity must be in.*no model config"):
        oneshot_args.check_inputs(args)
    (tmp_path / "ck" / "mp_rank_00_model_states.pt").write_bytes(b"")  # a tag folder: the hint alone
    with pytest.raises(oneshot.OneShotError, match="so it is a tag folder itself") as err:
        oneshot_args.check_inputs(args)
    assert "no model config" not in str(err.value)


def test_bad_arguments_fail_on_every_rank(checkpoint):
    root, ckpt, text = checkpoint
    argv = [ckpt, str(root / "bad"), "--sparsity", "1.0", "--calibration", str(root / "nope.txt"),
            "--layers_per_pass", "-1"]
    out = run_distributed(run_oneshot, 2, argv, timeout=60)
    for msg in out:
        assert msg.startswith("OneShotError") and "--sparsity must be in [0, 1)" in msg and "nope.txt" in msg
        assert "--layers_per_pass must be >= 0, got -1" in msg


def test_existing_output_dir_fails_before_any_work(checkpoint, tmp_path):
    root, ckpt, text = checkpoint
    (tmp_path / "out").mkdir()
    out = run_distributed(run_oneshot, 2, _argv(tmp_path, ckpt, text, "out"), timeout=60)
    for msg in out:
        assert msg.startswith("OneShotError") and "already exists (pass --overwrite)" in msg


def test_model_config_that_does_not_fit_the_checkpoint_is_named(checkpoint, tmp_path):
    root, ckpt, text = checkpoint
    config = _model().config
    config.n_inner = 32  # the checkpoint's MLPs have 64 neurons
    config.save_pretrained(str(tmp_path / "cfg"))
    argv = _argv(tmp_path, ckpt, text, "out", "--model_config", str(tmp_path / "cfg"))
    msg = run_distributed(run_oneshot, 1, argv, timeout=60)[0]
    assert msg.startswith("OneShotError") and "does not match checkpoint" in msg, msg
    assert "transformer.h.0.mlp.c_fc.weight: [32, 64] in the checkpoint, [32, 32] in the model" in msg


def test_model_type_without_an_adapter_is_named_before_any_work(checkpoint, tmp_path):
    """A Qwen3 checkpoint (no structure adapter) ended in a ValueError traceback after the data was read."""
    from transformers import Qwen3Config

    root, ckpt, text = checkpoint
    Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=264).save_pretrained(str(tmp_path / "cfg"))
    argv = _argv(tmp_path, ckpt, text, "out", "--model_config", str(tmp_path / "cfg"))
    msg = run_distributed(run_oneshot, 1, argv, timeout=60)[0]
    assert msg.startswith(f"OneShotError: {tmp_path / 'cfg'}: ds_bitter7 has no structure adapter for "
                          "model_type='qwen3' (supported: ['bitter7_gpt2', 'bitter7_llama', 'bitter7_mistral', "
                          "'gpt2', 'llama', 'mistral', 'qwen2'])"), msg


def test_model_the_export_would_refuse_is_named_before_any_work(checkpoint, tmp_path):
    """A Qwen2 model whose sliding window binds, with least squares (the default): the export
    refused it after the whole run."""
    from transformers import Qwen2Config

    root, ckpt, text = checkpoint
    Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=264,
                num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                max_window_layers=0).save_pretrained(str(tmp_path / "cfg"))
    argv = _argv(tmp_path, ckpt, text, "out", "--model_config", str(tmp_path / "cfg"))
    msg = run_distributed(run_oneshot, 1, argv, timeout=60)[0]
    assert msg == (f"OneShotError: {tmp_path / 'cfg'}: this qwen2 model's sliding window (4 tokens) binds: with scope "
                   "global and bias compensation its pruned model cannot be exported smaller (only a standard qwen2 "
                   "keeps the window: scope per_layer, no bias compensation): pass --scope per_layer --compensation "
                   "none"), msg


def _weights_only_checkpoint(folder) -> None:
    tag = folder / "global_step1"
    tag.mkdir()
    (folder / "latest").write_text("global_step1")
    model = _model()
    torch.save({"module": model.state_dict(), "optimizer": None}, tag / MODEL_STATES_FILE)
    model.config.save_pretrained(str(folder))


def oneshot_main(argv) -> int:
    return oneshot.main(argv)


def test_checkpoint_without_optimizer_state_names_magnitude(tmp_path):
    _weights_only_checkpoint(tmp_path)
    base = [str(tmp_path), str(tmp_path / "out"), "--sparsity", "0.5"]
    out = run_distributed(run_oneshot, 1, base + ["--score", "bitter7"], timeout=60)[0]
    assert re.search("no optimizer state.*--score obs, fluctuation or magnitude", out), out
    assert run_distributed(oneshot_main, 1, base + ["--score", "fisher"], timeout=60)[0] == 2
    out = run_distributed(run_oneshot, 1, base, timeout=60)[0]  # the default score
    assert "score 'bitter7_obs' needs Adam's exp_avg_sq; --score obs" in out, out


def test_magnitude_works_without_optimizer_state(tmp_path, checkpoint):
    root, _, text = checkpoint
    _weights_only_checkpoint(tmp_path)
    out = run_distributed(run_oneshot, 1, _argv(tmp_path, str(tmp_path), text, "out", "--score", "magnitude"),
                          timeout=90)[0]
    assert isinstance(out, dict), out
    assert out["event"]["sparsity"] == {"mlp_neuron": 0.5} and out["params_after"] < out["params_before"]


def test_least_squares_keeps_the_zeros_of_unstructured_training(checkpoint, tmp_path):
    """The refit writes into the next layer's kept rows; the elements unstructured pruning zeroed in
    training stay zero (they are the checkpoint's element masks)."""
    import ds_bitter7  # noqa: F401 - registers the exported model classes

    _, _, text = checkpoint
    ckpt = str(tmp_path / "ckpt")
    run_distributed(make_checkpoint, 2, ckpt, False, False, UNSTRUCTURED, timeout=120)
    assert os.path.isfile(os.path.join(ckpt, "config.json"))  # written by the engine's save, not the script
    zeros = {}
    for comp in ("least_squares", "none"):  # none: the checkpoint's weights on the same kept units
        out = run_distributed(run_oneshot, 2, _argv(tmp_path, ckpt, text, comp, "--structures", "mlp_neuron",
                                                    "--compensation", comp), timeout=90)[0]
        assert isinstance(out, dict), out
        small = AutoModelForCausalLM.from_pretrained(str(tmp_path / comp))
        zeros[comp] = {n: p.eq(0) for n, p in small.named_parameters() if n.endswith(("c_fc.weight", "c_proj.weight"))}
    assert out["unstructured_zeros_kept"] > 0 and out["event"]["sparsity"] == {"mlp_neuron": 0.5}
    for name, where in zeros["none"].items():
        assert 0.2 < float(where.float().mean()) < 0.8, name  # the training's zeros are there
        assert torch.equal(zeros["least_squares"][name], where), name


def test_seq_len_defaults_to_the_training_run_and_never_exceeds_the_positions(tmp_path):
    config = _model().config  # 64 positions
    info = oneshot.CheckpointInfo("t", str(tmp_path), [], True, {}, {}, None, seq_len=None)
    args = oneshot_args.parse_args([str(tmp_path), str(tmp_path / "out"), "--sparsity", "0.5"])
    assert oneshot_args.resolve_seq_len(args, info, config) == 64  # 256 capped at the position table
    info.seq_len = 32  # recorded by launch/train.py
    assert oneshot_args.resolve_seq_len(args, info, config) == 32
    args.seq_len = 128
    with pytest.raises(oneshot.OneShotError, match="--seq_len 128 is longer than the model's 64 positions"):
        oneshot_args.resolve_seq_len(args, info, config)
    with pytest.raises(oneshot.OneShotError, match="--seq_len must be >= 2"):
        oneshot_args.check_args(oneshot_args.parse_args([str(tmp_path), "o", "--sparsity", "0.5", "--seq_len", "1"]), None)


def test_tokenizer_beside_the_config_is_used_and_must_fit(tmp_path):
    from _launch_util import write_word_tokenizer

    write_word_tokenizer(tmp_path, 300)  # more ids than the model's 264
    args = oneshot_args.parse_args([str(tmp_path), "o", "--sparsity", "0.5"])
    with pytest.raises(oneshot.OneShotError, match=r"tokenizer \(.*\) has 300 ids but the model only 264"):
        oneshot.load_tokenizer(args, _model().config, str(tmp_path))
    args.tokenizer = None
    assert oneshot.load_tokenizer(args, _model().config, str(tmp_path / "none")).__class__.__name__ == "ByteTokenizer"
    big = _model().config
    big.vocab_size = 1000  # not a byte model: bytes would be the wrong ids, silently
    with pytest.raises(oneshot.OneShotError, match="no tokenizer files beside .*config.json and no --tokenizer"):
        oneshot.load_tokenizer(args, big, str(tmp_path / "none"))
    # unless the training run says it used bytes (launch/train.py records it), or --tokenizer bytes
    assert oneshot.load_tokenizer(args, big, str(tmp_path / "none"), "bytes").__class__.__name__ == "ByteTokenizer"
    args.tokenizer = "bytes"
    assert oneshot.load_tokenizer(args, big, str(tmp_path / "none")).__class__.__name__ == "ByteTokenizer"


def test_tokenizer_other_than_the_recorded_one_is_warned_about(tmp_path, caplog):
    """--tokenizer bytes on a checkpoint whose run trained with a tokenizer folder (or the reverse)
    fed the model other ids than it learned, with no word."""
    from _launch_util import write_word_tokenizer

    write_word_tokenizer(tmp_path / "tok", 300)
    big = _model().config
    big.vocab_size = 1000
    args = oneshot_args.parse_args([str(tmp_path), "o", "--sparsity", "0.5", "--tokenizer", "bytes"])
    with caplog.at_level("WARNING", logger="ds_bitter7.oneshot"):
        oneshot.load_tokenizer(args, big, str(tmp_path), "runs/tok")
    assert "trained with the tokenizer 'runs/tok' but this one-shot uses 'bytes'" in caplog.text
    caplog.clear()
    args.tokenizer = str(tmp_path / "tok")
    with caplog.at_level("WARNING", logger="ds_bitter7.oneshot"):
        oneshot.load_tokenizer(args, big, str(tmp_path), "bytes")
        assert "trained with the tokenizer 'bytes'" in caplog.text
        caplog.clear()
        oneshot.load_tokenizer(args, big, str(tmp_path), "elsewhere/tok")  # a moved folder: no word
    assert caplog.text == ""


def test_truncated_or_missing_rank_file_is_named_before_loading(checkpoint, tmp_path):
    """Checked before DeepSpeed loads (a rank failing inside its loading leaves the others waiting)."""
    import shutil

    from ds_bitter7.checkpoint_files import checkpoint_problems

    root, ckpt, text = checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    rank1 = copy / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(rank1, "r+b") as f:
        f.truncate(os.path.getsize(rank1) // 2)
    with pytest.raises(oneshot.OneShotError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt' is truncated"):
        checkpoint_loading.inspect_checkpoint(str(copy), None)
    rank1.write_bytes(b"")  # an empty file is no legacy torch file either
    with pytest.raises(oneshot.OneShotError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt' is truncated"):
        checkpoint_loading.inspect_checkpoint(str(copy), None)
    rank1.unlink()
    with pytest.raises(oneshot.OneShotError, match=r"saved by 2 data-parallel ranks: rank\(s\) \[1\] missing"):
        checkpoint_loading.inspect_checkpoint(str(copy), None)
    assert checkpoint_problems(str(copy)) and not checkpoint_problems(ckpt)  # export and resume use these
    rank0 = copy / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shutil.copy(ckpt + "/global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt", rank1)
    shutil.copy(rank0, copy / "global_step3" / "zero_pp_rank_2_mp_rank_00_optim_states.pt")  # a stale third rank's
    with pytest.raises(oneshot.OneShotError, match=r"rank\(s\) \[2\], but the checkpoint was saved by 2 data"):
        checkpoint_loading.inspect_checkpoint(str(copy), None)  # not a universal conversion of 3 files that fails inside


def test_report_folder_and_ds_config_are_checked_first(checkpoint, tmp_path):
    root, ckpt, text = checkpoint
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    args = oneshot_args.parse_args([ckpt, str(tmp_path / "out"), "--sparsity", "0.5", "--report",
                               str(tmp_path / "nodir" / "r.json"), "--ds_config", str(tmp_path / "bad.json"),
                               "--calibration", str(tmp_path / "empty")])
    with pytest.raises(oneshot.OneShotError) as e:
        oneshot_args.check_args(args, None)
    assert "nodir' does not exist" in str(e.value) and "is not valid JSON" in str(e.value), str(e.value)
    assert "--calibration: no .txt/" in str(e.value) and "files in the folder" in str(e.value), str(e.value)
    inside = oneshot_args.parse_args([ckpt, str(tmp_path / "out"), "--sparsity", "0.5", "--report",
                                 str(tmp_path / "out" / "oneshot.json")])
    oneshot_args.check_args(inside, None)  # a report inside OUTPUT_DIR: that folder is made by the export


def test_report_path_that_would_clobber_a_file_is_refused_first(checkpoint, tmp_path):
    """--report never replaces an input (the checkpoint's own `latest` here), a folder, or an
    existing file without --overwrite; inside OUTPUT_DIR it may only add a file to the export."""
    root, ckpt, text = checkpoint
    (tmp_path / "old.json").write_text("{}")

    def problems(report, *extra):
        return oneshot_args.report_problems(oneshot_args.parse_args([ckpt, str(tmp_path / "out"), "--sparsity", "0.5",
                                                           "--calibration", text, "--report", report, *extra]))

    assert "which this run reads" in problems(os.path.join(ckpt, "latest"))[0]
    assert "which this run reads" in problems(text)[0]
    assert "is a folder" in problems(str(tmp_path))[0]
    assert "is a folder (OUTPUT_DIR)" in problems(str(tmp_path / "out"))[0]
    assert "already exists (pass --overwrite" in problems(str(tmp_path / "old.json"))[0]
    assert problems(str(tmp_path / "old.json"), "--overwrite") == []
    assert problems(str(tmp_path / "out" / "summary.json")) == []
    argv = _argv(tmp_path, ckpt, text, "clobber", "--report", str(tmp_path / "clobber" / "config.json"))
    out = run_distributed(run_oneshot, 2, argv, timeout=120)
    assert out[0].startswith("OneShotError") and "would replace a file of the export" in out[0]
    assert out[1] == "OneShotError: export failed on another rank; see that rank's error"
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "clobber")).config.model_type.endswith("gpt2")


def test_infinite_ridge_is_refused(checkpoint):
    root, ckpt, text = checkpoint
    args = oneshot_args.parse_args([ckpt, str(root / "x"), "--sparsity", "0.5", "--ridge", "inf"])
    with pytest.raises(oneshot.OneShotError, match="--ridge must be a finite number >= 0, got inf"):
        oneshot_args.check_args(args, None)


def _convert_into_each_ranks_own_folder(ckpt: str, root: str) -> str:
    import torch.distributed as dist

    from ds_bitter7.checkpoint_loading import inspect_checkpoint, to_universal
    from ds_bitter7.comm import Communicator

    work = os.path.join(root, f"node{dist.get_rank()}.universal_tmp")
    os.environ["DS_BITTER7_SHARED_FS_WAIT"] = "0"  # a local disk caches no lookup: no need to wait
    try:
        return to_universal(inspect_checkpoint(ckpt, None), work, Communicator())
    except oneshot.OneShotError as err:
        return f"OneShotError: {err}"


def test_conversion_folder_that_another_node_does_not_see_is_named(checkpoint, tmp_path):
    """An OUTPUT_DIR local to each node: rank 0's conversion was invisible to the others, which
    failed inside DeepSpeed's loading with a missing file. Now found before the conversion."""
    root, ckpt, _ = checkpoint
    out = run_distributed(_convert_into_each_ranks_own_folder, 2, ckpt, str(tmp_path), timeout=150)
    assert out[0].startswith(f"OneShotError: rank 0 converts the checkpoint for 2 ranks into "
                             f"'{tmp_path / 'node0.universal_tmp'}', which rank(s) 1 do not see: put OUTPUT_DIR "
                             "on a file system every node sees"), out[0]
    assert out[1].startswith("OneShotError: rank 0 converts") and "rank(s) 1 do not see" in out[1], out[1]
    assert not (tmp_path / "node0.universal_tmp").exists()  # a full fp32 copy: removed


def test_conversion_folder_is_deleted_only_when_oneshot_made_it(checkpoint, tmp_path):
    """OUTPUT_DIR.universal_tmp is emptied before a conversion: a folder there that one-shot did not
    make (the user's, or the very checkpoint being read) is refused before any work, and kept."""
    root, ckpt, text = checkpoint
    args = oneshot_args.parse_args([ckpt, str(tmp_path / "out"), "--sparsity", "0.5"])
    work = tmp_path / "out.universal_tmp"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    assert "was not made by ds_bitter7.oneshot" in oneshot_args.output_dir_problem(args, ckpt)
    assert (work / "notes.txt").read_text() == "mine"
    (work / checkpoint_loading.UNIVERSAL_MARK).write_text("")  # an interrupted earlier conversion: replaced
    assert oneshot_args.output_dir_problem(args, ckpt) is None


def test_shortfall_and_already_pruned_count_units():
    """0.6 of 192 is 115 units, whose fraction in float32 is below 0.6: not a shortfall; per_layer
    keeps no minimum, so it never warns."""
    from types import SimpleNamespace

    def pruner(n_pruned):  # 192 live neurons (Pruner.pruned_units)
        return SimpleNamespace(pruned_units=lambda: {"mlp_neuron": (n_pruned, 192)})

    args = SimpleNamespace(scope="global", min_units_per_layer=1, structures=["mlp_neuron"], sparsity=0.6)
    assert float(torch.tensor([False] * 115 + [True] * 77).float().mean()) != 0.6  # the trap
    assert oneshot.shortfall(pruner(115), args) == {}
    assert oneshot.shortfall(pruner(114), args) == {"mlp_neuron": 114 / 192}
    assert oneshot.shortfall(pruner(114), SimpleNamespace(**{**vars(args), "scope": "per_layer"})) == {}
    # units pruned in training beyond the target: this run removes none (a warning says so)
    assert oneshot.already_pruned(pruner(115), args) == {}
    assert oneshot.already_pruned(pruner(116), args) == {"mlp_neuron": 116 / 192}


def test_per_layer_scope_names_layers_pruned_past_the_target_in_training():
    """A checkpoint pruned with a global threshold took 75% of one layer: --scope per_layer 0.5 cannot
    give those units back, so that layer ends narrower (a warning names it; it was silent). An
    export's placeholder unit is not counted; a global scope never warns."""
    from types import SimpleNamespace

    from ds_bitter7.config import StructureName

    def group(key, kind, n):
        return SimpleNamespace(key=key, kind=kind, n_units=n)

    groups = [group("layers.0.mlp", StructureName.mlp_neuron, 8), group("layers.1.mlp", StructureName.mlp_neuron, 8),
              group("layers.0.attn", StructureName.attention_head, 4), group("layers.1.attn", StructureName.attention_head, 1)]
    masks = {"layers.0.mlp": torch.tensor([True] * 4 + [False] * 4),  # 4 of 8 pruned: 0.5 allows 4
             "layers.1.mlp": torch.tensor([True] * 2 + [False] * 6),  # 6 of 8 pruned
             "layers.0.attn": torch.tensor([True, False, False, False]),  # 3 of 4 pruned
             "layers.1.attn": torch.tensor([False])}  # an export's placeholder
    pruner = SimpleNamespace(groups=groups, masks=masks, placeholders={"layers.1.attn"})
    args = SimpleNamespace(scope="per_layer", structures=["mlp_neuron", "attention_head"], sparsity=0.5)
    assert oneshot.layers_past_target(pruner, args) == ["layers.1.mlp", "layers.0.attn"]
    assert oneshot.layers_past_target(pruner, SimpleNamespace(**{**vars(args), "structures": ["mlp_neuron"]})) == [
        "layers.1.mlp"]
    assert oneshot.layers_past_target(pruner, SimpleNamespace(**{**vars(args), "scope": "global"})) == []
    # the global "removes no more" warning does not apply: layers below their own floor still lose units
    pruner.pruned_units = lambda: {"mlp_neuron": (10, 16), "attention_head": (3, 4)}
    assert oneshot.already_pruned(pruner, args) == {}
    assert oneshot.already_pruned(pruner, SimpleNamespace(**{**vars(args), "scope": "global"})) == {
        "mlp_neuron": 10 / 16, "attention_head": 3 / 4}


def test_min_units_per_layer_shortfall_is_reported_and_can_be_lifted(checkpoint, tmp_path):
    """8 heads in 2 layers: 90% is 7 heads, but one kept per layer stops at 6 (75%); with
    --min_units_per_layer 0 a layer loses all its heads and the model still exports."""
    root, ckpt, text = checkpoint
    common = ("--structures", "attention_head", "--score", "magnitude", "--compensation", "none")
    argv = _argv(tmp_path, ckpt, text, "kept", *common)
    argv[argv.index("--sparsity") + 1] = "0.9"
    capped = run_distributed(run_oneshot, 1, argv, timeout=150)[0]
    assert isinstance(capped, dict), capped
    assert capped["event"]["sparsity"] == {"attention_head": 0.75}
    assert "reached 75.0% of attention_head, not 90.0%" in capped["warning"]
    argv = [a.replace("kept", "all") for a in argv] + ["--min_units_per_layer", "0"]
    lifted = run_distributed(run_oneshot, 1, argv, timeout=150)[0]
    assert lifted["event"]["sparsity"] == {"attention_head": 0.875} and "warning" not in lifted
    small = AutoModelForCausalLM.from_pretrained(str(tmp_path / "all"), trust_remote_code=True)
    assert sum(p.numel() for p in small.parameters()) == lifted["params_after"]
    assert "(step 3)" in (tmp_path / "all" / "pruning_report.md").read_text()  # the checkpoint's step


def test_bf16_checkpoint_loads_in_bf16_and_gets_least_squares(tmp_path, checkpoint):
    """A bf16 ZeRO-2 checkpoint: one-shot loads it with its own config (bf16 model, fp32 masters)
    and the refit reaches the model; the export holds the pruned model."""
    root, _, text = checkpoint
    ckpt = str(tmp_path / "bf16")
    run_distributed(make_checkpoint, 2, ckpt, False, True, timeout=120)
    out = run_distributed(run_oneshot, 2, _argv(tmp_path, ckpt, text, "small", "--score", "bitter7"), timeout=150)
    assert isinstance(out[0], dict), out[0]
    assert out[0]["event"]["thresholds"] == out[1]["event"]["thresholds"]
    assert out[0]["event"]["compensation"]["mode"] == "least_squares"
    assert out[0]["ppl_after"] < 2 * out[0]["ppl_before"]  # the refit in bf16 keeps the model usable
    small = AutoModelForCausalLM.from_pretrained(str(tmp_path / "small"), trust_remote_code=True)
    assert sum(p.numel() for p in small.parameters()) == out[0]["params_after"]


def test_ds_config_of_another_zero_stage_is_refused(tmp_path):
    """Stage 0 for ZeRO files, 1/2 for a stage-0 checkpoint, and stage 3 would fail inside
    DeepSpeed's loading (AttributeError, AssertionError); ZeRO-1 files load at stage 2."""
    import json

    zero = oneshot.CheckpointInfo("t", str(tmp_path), [str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")],
                                  True, {}, {}, None)
    stage0 = oneshot.CheckpointInfo("t", str(tmp_path), [], True, {}, {}, None)
    weights = oneshot.CheckpointInfo("t", str(tmp_path), [], False, {}, {}, None)
    cases = [(zero, 0, "has ZeRO stage 0, but checkpoint .* keeps its optimizer state in ZeRO files"),
             (zero, 1, None), (zero, 2, None), (zero, 3, "ZeRO stage 3: ds_bitter7 works with ZeRO stage 0, 1 and 2"),
             (stage0, 0, None), (stage0, 2, "has ZeRO stage 2, but checkpoint .* was saved at stage 0"),
             (weights, 2, None)]
    cases.append((zero, None, None))  # no zero_optimization section: loading gives it the checkpoint's stage
    for info, stage, error in cases:
        (tmp_path / "ds.json").write_text(json.dumps({} if stage is None else {"zero_optimization": {"stage": stage}}))
        args = oneshot_args.parse_args([str(tmp_path), str(tmp_path / "o"), "--sparsity", "0.5", "--score", "magnitude",
                                   "--ds_config", str(tmp_path / "ds.json")])
        if error is None:
            oneshot_args.check_args(args, info)
        else:
            with pytest.raises(oneshot.OneShotError, match=error):
                oneshot_args.check_args(args, info)
    # offload: one-shot takes no step and loads without it (the training run's config may have it)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    oneshot_args.check_args(oneshot_args.parse_args([str(tmp_path), str(tmp_path / "o"), "--sparsity", "0.5", "--score",
                                           "magnitude", "--ds_config", str(tmp_path / "ds.json")]), zero)


def test_zero3_checkpoint_is_named(tmp_path):
    from ds_bitter7.checkpoint_files import ExportError, load_pruner_state

    tag = tmp_path / "global_step1"
    tag.mkdir()
    (tmp_path / "latest").write_text("global_step1")
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(oneshot.OneShotError, match="saved under ZeRO stage 3 .*ZeRO stage 0, 1 and 2 checkpoints only"):
        checkpoint_loading.inspect_checkpoint(str(tmp_path), None)
    with pytest.raises(ExportError, match="saved under ZeRO stage 3"):
        load_pruner_state(str(tmp_path), "global_step1")


def test_ds_config_of_the_other_precision_is_refused(tmp_path):
    """DeepSpeed names a bf16 run's ZeRO files bf16_zero_pp_rank_*: an fp32 --ds_config would look
    for zero_pp_rank_* and fail inside DeepSpeed's loading with a bare FileNotFoundError."""
    import json

    files = [str(tmp_path / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for r in (0, 1)]
    info = oneshot.CheckpointInfo("t", str(tmp_path), files, True, {}, {}, None)
    for name, section, bad in (("fp32.json", {}, True), ("bf16.json", {"bf16": {"enabled": True}}, False)):
        (tmp_path / name).write_text(json.dumps({"zero_optimization": {"stage": 2}, **section}))
        args = oneshot_args.parse_args([str(tmp_path), str(tmp_path / "o"), "--sparsity", "0.5", "--ds_config",
                                   str(tmp_path / name)])
        if bad:
            with pytest.raises(oneshot.OneShotError, match="does not enable bf16, but checkpoint .* was saved with it"):
                oneshot_args.check_args(args, info)
        else:
            oneshot_args.check_args(args, info)
    stage0 = oneshot.CheckpointInfo("t", str(tmp_path), [], True, {}, {}, None)  # fp32, stage 0
    for section in ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, {"fp16": {"enabled": True}}):
        (tmp_path / "half.json").write_text(json.dumps(section))  # was: KeyError 'dynamic_loss_scale' inside DeepSpeed
        args = oneshot_args.parse_args([str(tmp_path), str(tmp_path / "o"), "--sparsity", "0.5", "--ds_config",
                                   str(tmp_path / "half.json")])
        with pytest.raises(oneshot.OneShotError, match=r"enabled with zero_optimization.stage = 0"):
            oneshot_args.check_args(args, stage0)


def test_rank_file_with_corrupt_contents_is_named(checkpoint, tmp_path):
    """A rank file whose zip directory is whole but whose pickle is garbage: its CRC names it on
    every rank before loading; rewritten with a valid CRC, it fails inside DeepSpeed's loading,
    where that rank names the checkpoint. No rank waits."""
    import shutil
    import zipfile

    root, ckpt, text = checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    rank_file = copy / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(rank_file, "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 1800)
    out = run_distributed(run_oneshot, 2, _argv(tmp_path, str(copy), text, "out"), timeout=120)
    assert all(o.startswith("OneShotError") and "is truncated or corrupt (Bad CRC-32" in o for o in out), out
    with zipfile.ZipFile(rank_file) as archive:  # a garbage pickle, with its CRC
        records = [(info.filename, b"\xff" * info.file_size if info.filename.endswith("data.pkl")
                    else _raw(archive, info)) for info in archive.infolist()]
    with zipfile.ZipFile(rank_file, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            archive.writestr(name, data)
    out = run_distributed(run_oneshot, 2, _argv(tmp_path, str(copy), text, "out"), timeout=120)
    assert out[1].startswith("OneShotError") and "could not load" in out[1] and "on rank 1" in out[1], out[1]
    assert out[0].startswith("OneShotError"), out[0]
    assert not (tmp_path / "out").exists()


def _raw(archive, info) -> bytes:
    """A record's stored bytes, without the CRC check (the damaged pickle's is wrong)."""
    with archive.open(info) as f:
        f._expected_crc = None
        return f.read()


def test_a_bitter7_section_in_ds_config_is_said_to_be_unused(tmp_path):
    """One-shot prunes as its flags say: a training config's section (other structures, a typo)
    was dropped without a word."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": 2, "bitter7": {
        "score": "bitter7", "structures": ["attention_head", "mlp_neuron"], "target_sparsity": 0.5, "scope": "global"}}))
    args = oneshot_args.parse_args([str(tmp_path), str(tmp_path / "o"), "--sparsity", "0.5", "--ds_config", str(config)])
    assert oneshot_args.unused_section(args) == (f"--ds_config {str(config)!r}: its bitter7 section is not used (one-shot "
                                            "prunes as its flags say); to follow it, pass --score bitter7 --structures "
                                            "attention_head mlp_neuron")
    args.structures, args.score = ["mlp_neuron", "attention_head"], "bitter7"  # the same, in another order
    assert oneshot_args.unused_section(args).endswith("(one-shot prunes as its flags say)")
    config.write_text(json.dumps({"bitter7": {"structures": ["unstructured"], "score": "bitter7"}}))
    assert oneshot_args.unused_section(args).endswith("(one-shot prunes as its flags say)")  # none it could follow
    config.write_text(json.dumps({"bitter7": {"score": "bitter8"}}))  # said, with what is wrong
    assert "its bitter7 section is not used (one-shot prunes as its flags say); it is not valid either:" in (
        oneshot_args.unused_section(args)) and "bitter8" in oneshot_args.unused_section(args)
    config.write_text(json.dumps({"train_batch_size": 2}))
    assert oneshot_args.unused_section(args) is None
