"""The "bitter7" config section: defaults, bounds, and one error naming every bad key."""

from __future__ import annotations

import json
import re

import pytest

from ds_bitter7.config import check_deepspeed_support, parse_config


def test_defaults_and_missing_section():
    assert parse_config({}).enabled is False
    cfg = parse_config({"bitter7": {}})
    assert cfg.enabled and cfg.score == "bitter7" and cfg.structures == ["mlp_neuron"]
    assert cfg.eps == 1e-8 and cfg.exponent == 0.25 and cfg.scope == "global"


def test_reads_json_path(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bitter7": {"target_sparsity": 0.7, "structures": ["attention_head"]}}))
    cfg = parse_config(str(path))
    assert cfg.target_sparsity == 0.7 and cfg.structures == ["attention_head"]


def test_every_bad_key_is_named_at_once():
    with pytest.raises(ValueError) as e:
        parse_config({"bitter7": {"target_sparsity": 1.0, "score": "random", "structures": ["neurons"],
                                  "scope": "local", "eps": "tiny", "typo_key": 1,
                                  "schedule": {"frequency": 0, "shape": "square"},
                                  "bias_compensation": {"mode": "median"}}})
    msg = str(e.value)
    for needle in ("bitter7.target_sparsity = 1.0", "bitter7.score = 'random'", "bitter7.structures.0 = 'neurons'",
                   "bitter7.scope = 'local'", "bitter7.eps = 'tiny'", "bitter7.typo_key = 1: unknown key",
                   "bitter7.schedule.frequency = 0", "bitter7.schedule.shape = 'square'",
                   "bitter7.bias_compensation.mode = 'median'"):
        assert needle in msg, (needle, msg)
    assert ("'bitter7', 'magnitude', 'movement', 'fisher', 'bitter7_variance', 'fluctuation', 'obs' or "
            "'bitter7_obs'") in msg


def test_checks_across_keys_are_named_with_the_bad_keys():
    """end_step < start_step and a bad score/scope pair are reported in the same error as a bad
    frequency and a bad structure, not only once those are fixed."""
    with pytest.raises(ValueError) as e:
        parse_config({"bitter7": {"score": "obs", "scope": "standardized", "structures": ["neurons"],
                                  "schedule": {"start_step": 100, "end_step": 50, "frequency": 0}}})
    msg = str(e.value)
    for needle in ("(4 problem(s))", "bitter7.schedule.frequency = 0", "bitter7.structures.0 = 'neurons'",
                   "end_step (50) must be >= start_step (100)", "score 'obs' ranks units by the step"):
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("section, needle", [
    ({"target_sparsity": -0.1}, "greater than or equal to 0"),
    ({"schedule": {"start_step": 5, "end_step": 2}}, "end_step (2) must be >= start_step (5)"),
    ({"structures": []}, "bitter7.structures"),
    ({"structures": ["mlp_neuron", "mlp_neuron"]}, "must not repeat"),
    ({"enabled": "maybe"}, "bitter7.enabled = 'maybe'"),
    ({"enabled": "no"}, "bitter7.enabled = 'no': Input should be a valid boolean"),  # no lax strings
    ({"bias_compensation": {"enabled": "yes"}}, "bitter7.bias_compensation.enabled = 'yes'"),
    ({"target_sparsity": "0.5"}, "bitter7.target_sparsity = '0.5': Input should be a valid number"),  # no lax numbers
    ({"target_sparsity": True}, "bitter7.target_sparsity = True: Input should be a valid number"),
    ({"schedule": {"frequency": 10.0}}, "bitter7.schedule.frequency = 10.0: Input should be a valid integer"),
    ({"bias_compensation": {"num_batches": "8"}}, "bitter7.bias_compensation.num_batches = '8'"),
    ({"bias_compensation": {"source": "training", "layers_per_pass": 2}}, "training forwards, which cannot be run again"),
    ({"structures": ["unstructured"], "bias_compensation": {"enabled": True}}, "removes no units"),
    ({"structures": ["unstructured"], "score": "bitter7_variance"}, "does not apply to structures ['unstructured']"),
    ({"structures": ["unstructured"], "score": "obs"}, "does not apply to structures ['unstructured']"),
    ({"structures": ["mlp_neuron", "unstructured"], "score": "fluctuation"}, "'fluctuation' scores whole units"),
    ({"score": "obs", "scope": "standardized"}, "score 'obs' ranks units by the step"),
    ({"score": "bitter7_obs", "scope": "standardized"}, "score 'bitter7_obs' ranks units by the step"),
    ({"structures": ["unstructured"], "score": "bitter7_obs"}, "does not apply to structures ['unstructured']"),
    ({"exponent": float("inf")}, "bitter7.exponent = inf: Input should be a finite number"),  # JSON's Infinity
    ({"eps": float("inf")}, "bitter7.eps = inf: Input should be a finite number"),
    ({"bias_compensation": {"ridge": float("inf")}}, "bitter7.bias_compensation.ridge = inf"),
])
def test_single_problems(section, needle):
    with pytest.raises(ValueError, match="Invalid 'bitter7' config") as e:
        parse_config({"bitter7": section})
    assert needle in str(e.value)


def test_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        parse_config(str(bad))
    with pytest.raises(ValueError, match="not found"):
        parse_config(str(tmp_path / "missing.json"))


def test_config_that_would_silently_turn_pruning_off_is_refused(tmp_path):
    """A file that is no JSON object, a null section and a misspelt section name are errors: a
    missing section means dense training, and these read as if it were there."""
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json holds a JSON list, not an object"):
        parse_config(str(listed))
    with pytest.raises(ValueError, match="Invalid 'bitter7' config: null"):
        parse_config({"bitter7": None})
    with pytest.raises(ValueError, match="has a section 'bitter_7', not 'bitter7'"):
        parse_config({"bitter_7": {"target_sparsity": 0.5}})
    assert not parse_config({"train_batch_size": 8}).enabled  # no section: dense, as before


def test_zero3_and_offload_are_refused():
    with pytest.raises(ValueError) as e:
        check_deepspeed_support({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    assert "zero_optimization.stage = 3" in str(e.value) and "offload_optimizer.device = 'cpu'" in str(e.value)
    # DeepSpeed's deprecated offload flag, round-robin gradients (its master mapping does not hold) and
    # Muon at ZeRO 1/2 (its momentum lies outside the partition) were accepted and went wrong later
    with pytest.raises(ValueError) as e:
        check_deepspeed_support({"zero_optimization": {"stage": 2, "cpu_offload": True, "round_robin_gradients": "true"},
                                 "optimizer": {"type": "Muon", "params": {"lr": 0.02}}})
    assert "zero_optimization.cpu_offload = true: CPU offload is not supported yet" in str(e.value)
    assert "zero_optimization.round_robin_gradients = true: DeepSpeed's fp32 master mapping" in str(e.value)
    assert "optimizer.type = 'Muon' with ZeRO stage 2: DeepSpeed keeps Muon's momentum" in str(e.value)
    check_deepspeed_support({"zero_optimization": {"stage": 2, "round_robin_gradients": False}, "optimizer": {"type": "AdamW"}})
    # prepare_model, called before Trainer(...) builds the engine, refuses them there (not only attach, after)
    from transformers import GPT2Config, GPT2LMHeadModel

    from ds_bitter7 import prepare_model

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=8))
    with pytest.raises(ValueError, match="zero_optimization.stage = 3"):
        prepare_model(model, {"bitter7": {"target_sparsity": 0.5}, "zero_optimization": {"stage": 3}})
    assert prepare_model(model, {"zero_optimization": {"stage": 3}}) == []  # pruning off: not its business


def test_launch_scripts_read_the_config_with_its_deepspeed_settings(tmp_path):
    """The launch scripts' config check (``cli.read_ds_config``, before a model or data is built)
    refuses the DeepSpeed settings the pruner cannot serve too; the HF script found them only
    after building the data and the model, launch/train.py after both as well."""
    from ds_bitter7 import cli

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "round_robin_gradients": True},
                                "bitter7": {"target_sparsity": 0.5}}))
    with pytest.raises(SystemExit, match=rf"^x.py --deepspeed {path}: DeepSpeed config not supported by ds_bitter7:\n"
                                         r"  zero_optimization.round_robin_gradients = true"):
        cli.read_ds_config(str(path), "x.py --deepspeed")
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}))
    ds_config, cfg = cli.read_ds_config(str(path), "x.py --deepspeed")  # pruning off: not its business
    assert not cfg.enabled and ds_config["zero_optimization"]["stage"] == 2
    with pytest.raises(SystemExit, match=f"^x.py --deepspeed {tmp_path}/none.json: DeepSpeed config file not found"):
        cli.read_ds_config(str(tmp_path / "none.json"), "x.py --deepspeed")


def test_unknown_model_family_is_refused():
    from transformers import BertConfig, BertModel

    from ds_bitter7.structures import get_adapter

    with pytest.raises(ValueError, match=r"model_type='bert'.*supported: \[.*'gpt2', 'llama'"):
        get_adapter(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=37)))


def test_model_without_blocks_is_refused_before_deepspeed_starts():
    """n_layer 0 trained with a pruner of no units and reported nothing pruned (a library user's own
    model: the launch scripts' build_config refuses it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import ds_bitter7

    model = GPT2LMHeadModel(GPT2Config(n_layer=0, n_embd=32, n_head=2, vocab_size=264))
    with pytest.raises(ValueError, match=r"^the gpt2 model has no blocks \(transformer.h is empty\): nothing to prune$"):
        ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                              config={"train_batch_size": 1, "bitter7": {"target_sparsity": 0.5}})


def test_standardized_scope_is_for_units_only():
    assert parse_config({"bitter7": {"scope": "standardized"}}).scope == "standardized"
    with pytest.raises(ValueError, match="'standardized'.*unstructured"):
        parse_config({"bitter7": {"scope": "standardized", "structures": ["unstructured"]}})


def test_deepspeed_forms_and_half_precision_at_stage_0():
    from ds_bitter7.config import check_deepspeed_support

    check_deepspeed_support({"zero_optimization": True})  # DeepSpeed's deprecated form of stage 1
    for dtype in ("fp16", "bf16", "bfloat16"):  # bfloat16: DeepSpeed's other name for the section
        with pytest.raises(ValueError, match=f"{dtype}.enabled with zero_optimization.stage = 0"):
            check_deepspeed_support({dtype: {"enabled": True}})
        check_deepspeed_support({dtype: {"enabled": True}, "zero_optimization": {"stage": 1}})
    with pytest.raises(ValueError, match="bf16.enabled with zero_optimization.stage = 0"):
        check_deepspeed_support({"bf16": {"enabled": "true"}})  # DeepSpeed reads the string as true
    check_deepspeed_support({"bf16": {"enabled": "false"}})  # and this one as false
    for ds_config, message in (({"fp16": True}, "fp16 = True: must be a JSON object, such as {\"enabled\": true}"),
                               ({"zero_optimization": [2]}, "zero_optimization = \\[2\\]: must be a JSON object"),
                               ({"zero_optimization": {"stage": "2"}}, "stage = '2': must be the integer 0, 1 or 2"),
                               ({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
                                "offload_optimizer = 'cpu': must be a JSON object")):
        with pytest.raises(ValueError, match=message):  # not an AttributeError
            check_deepspeed_support(ds_config)


def test_no_error_is_made_up_from_a_default():
    """A bad end_step is not replaced by its default 0 to then report 'end_step (0) < start_step'."""
    with pytest.raises(ValueError) as e:
        parse_config({"bitter7": {"schedule": {"start_step": 100, "end_step": None}}})
    assert "(1 problem(s))" in str(e.value) and "end_step (0)" not in str(e.value), str(e.value)


def test_errors_raised_on_every_rank_are_marked():
    """raise_if_any's errors exit normally under mpirun (abort_job_on_error lets them through)."""
    from ds_bitter7.comm import Communicator, abort_job_on_error

    with pytest.raises(ValueError) as e, abort_job_on_error():
        Communicator().raise_if_any(ValueError("same on every rank"), "a check")
    assert e.value.on_every_rank is True


def test_every_bad_combination_is_named_at_once():
    with pytest.raises(ValueError) as e:
        parse_config({"bitter7": {"score": "obs", "scope": "standardized", "structures": ["unstructured"]}})
    msg = str(e.value)
    assert msg.startswith("Invalid 'bitter7' config (3 problem(s)):\n"), msg  # was '(1 problem(s))'
    for needle in ("  bitter7: scope 'standardized' ranks whole units", "  bitter7: score 'obs' ranks units by the step",
                   "  bitter7: score 'obs' scores whole units"):
        assert any(line.startswith(needle) for line in msg.splitlines()), (needle, msg)
    with pytest.raises(ValueError) as e:  # a bad key in the same model hid every combination problem
        parse_config({"bitter7": {"structures": ["unstructured"], "scope": "standardized",
                                  "bias_compensation": {"enabled": True, "source": "bogus"}}})
    assert str(e.value).startswith("Invalid 'bitter7' config (2 problem(s)):") and \
        "scope 'standardized' ranks whole units" in str(e.value), str(e.value)


def test_json_integers_are_numbers():
    """Strict numbers still take a JSON integer where a float is asked (`"ridge": 0`)."""
    cfg = parse_config({"bitter7": {"target_sparsity": 0, "bias_compensation": {"ridge": 0}, "exponent": 1}})
    assert cfg.target_sparsity == 0.0 and cfg.bias_compensation.ridge == 0.0 and cfg.exponent == 1.0


def test_initialize_takes_deepspeeds_arguments():
    """DeepSpeed's first six positions, then keywords only: a seventh positional argument is
    DeepSpeed's distributed_port, not ``config``, so it is refused rather than misread."""
    import inspect

    import deepspeed

    import ds_bitter7

    ours = inspect.signature(ds_bitter7.initialize).parameters
    theirs = inspect.signature(deepspeed.initialize).parameters
    positional = [n for n, p in ours.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == list(theirs)[:6]
    with pytest.raises(TypeError):
        ds_bitter7.initialize(None, None, None, None, None, None, {"train_batch_size": 1})


def test_auto_values_deepspeed_would_read_as_numbers():
    """launch/train.py has no Trainer to fill them in; DeepSpeed's sections default theirs."""
    from ds_bitter7.cli import auto_keys

    config = {"train_batch_size": "auto", "gradient_clipping": 1.0, "optimizer": {"params": {"lr": "auto"}},
              "scheduler": {"params": {"warmup_num_steps": "auto"}}, "bf16": {"enabled": "auto"},
              "zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"},
              "data_types": {"keep_in_fp32_modules": "auto"}}
    assert auto_keys(config) == ["train_batch_size", "optimizer.params.lr", "scheduler.params.warmup_num_steps",
                                 "bf16.enabled"]


def test_optimizer_sections_deepspeed_cannot_read_are_named(tmp_path):
    """"params": null and three betas failed with an AttributeError / unpacking traceback naming no
    key (in the HF script after the model and data were built; in DeepSpeed's optimizer for
    launch/train.py)."""
    from ds_bitter7.cli import read_ds_config

    path = tmp_path / "ds.json"
    for section, problem in (({"optimizer": {"type": "AdamW", "params": None}}, "optimizer.params = None: an object"),
                             ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95, 0.99]}}},
                              "optimizer.params.betas = [0.9, 0.95, 0.99]: two numbers are expected"),
                             ({"scheduler": "WarmupLR"}, "scheduler = 'WarmupLR': an object is expected")):
        path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, **section}))
        with pytest.raises(SystemExit, match=re.escape(problem)):
            read_ds_config(str(path), "--config")
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"betas": "auto", "lr": "auto"}}}))
    assert read_ds_config(str(path), "--deepspeed", trainer=True)[0]["optimizer"]["params"]["betas"] == "auto"


def test_the_bf16_section_is_read_as_deepspeed_reads_it():
    """DeepSpeed reads "bfloat16" only where "bf16" is absent (an empty "bf16" is bf16 off)."""
    from ds_bitter7.config import bf16_enabled

    assert bf16_enabled({"bf16": {}, "bfloat16": {"enabled": True}}) is False
    assert bf16_enabled({"bfloat16": {"enabled": True}}) is True
    assert bf16_enabled({"bf16": {"enabled": "auto"}}) is None and bf16_enabled({}) is False


def test_build_or_exit_keeps_the_traceback_of_a_bug(capsys):
    """A bad path or name is one line; anything else (a shape error) keeps its traceback."""
    import torch

    from ds_bitter7.cli import build_or_exit

    with pytest.raises(SystemExit, match="^building the data: ValueError: data path 'x' does not exist$"):
        build_or_exit("building the data", lambda: (_ for _ in ()).throw(ValueError("data path 'x' does not exist")))
    with pytest.raises(RuntimeError):
        build_or_exit("building the model", lambda: torch.zeros(3) @ torch.zeros(4))
    assert build_or_exit("loading the tokenizer", lambda: 7) == 7


def test_batch_sizes_must_be_positive_integers():
    """The launch scripts read them before DeepSpeed: "4" failed with a TypeError naming no key."""
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = '4': must be a positive integer"):
        check_deepspeed_support({"train_micro_batch_size_per_gpu": "4"})
    with pytest.raises(ValueError, match="gradient_accumulation_steps = 0"):
        check_deepspeed_support({"gradient_accumulation_steps": 0})
    check_deepspeed_support({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2})  # the HF Trainer's
