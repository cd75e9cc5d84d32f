#!/usr/bin/env python
"""Hugging Face ``Trainer`` + DeepSpeed + ds_bitter7 (through ``Bitter7Callback``).

    torchrun --nproc_per_node 2 launch/train_hf_trainer.py --deepspeed ds_configs/cpu_demo.json \
        --output_dir runs/hf --max_steps 100 --save_steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List

import torch
from transformers import TrainerCallback

try:
    import ds_bitter7  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ds_bitter7  # noqa: F401
from ds_bitter7 import cli, modeling
from ds_bitter7 import data as dsdata
from ds_bitter7.checkpoint_files import checkpoint_problems
from ds_bitter7.cli import check_launch_args
from ds_bitter7.comm import abort_job_on_error, init_distributed
from ds_bitter7.config import bf16_enabled
from ds_bitter7.hf_trainer import Bitter7Callback, prepare_model


def collate(rows: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    ids = dsdata.collate_blocks(rows)["input_ids"]
    return {"input_ids": ids, "labels": ids}


def trainer_settings(ds_config: Dict) -> Dict:
    """TrainingArguments that must agree with the DeepSpeed config (the HF integration checks
    them): batch size, accumulation, and the optimizer's and warm-up scheduler's numbers."""
    opt = (ds_config.get("optimizer") or {}).get("params", {})
    sched = (ds_config.get("scheduler") or {}).get("params", {})
    out = {"per_device_train_batch_size": ds_config.get("train_micro_batch_size_per_gpu", 4),
           "gradient_accumulation_steps": ds_config.get("gradient_accumulation_steps", 1),
           "learning_rate": opt.get("lr", 1e-3)}
    if isinstance(opt.get("betas"), (list, tuple)):
        out["adam_beta1"], out["adam_beta2"] = opt["betas"]
    for hf, ds, params in (("adam_epsilon", "eps", opt), ("weight_decay", "weight_decay", opt),
                           ("warmup_steps", "warmup_num_steps", sched), ("max_grad_norm", "gradient_clipping", ds_config)):
        if isinstance(params.get(ds), (int, float)):
            out[hf] = params[ds]
    out["bf16"] = bf16_enabled(ds_config) is True
    out["fp16"] = (ds_config.get("fp16") or {}).get("enabled") is True
    return {k: v for k, v in out.items() if v != "auto"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed", required=True, help="DeepSpeed JSON config with a bitter7 section")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default="tiny-gpt2")
    p.add_argument("--model_overrides", default="{}")
    p.add_argument("--data", nargs="+", default=["builtin"])
    p.add_argument("--data_config", help="configuration of a hub dataset (wikitext: e.g. wikitext-103-raw-v1)")
    p.add_argument("--tokenizer")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--save_steps", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in output_dir")
    p.add_argument("--summary", help="JSON summary path (rank 0)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    args = p.parse_args(argv)
    check_launch_args(p, args, (("seq_len", 2), ("max_steps", 1), ("save_steps", 1), ("seed", 0)))  # -1 steps: 3 epochs
    return args


def path_problems(args, rank: int) -> List[str]:
    """What this rank's file system refuses in the arguments (``cli.path_problems``, and the
    ``checkpoint-N`` folders in --output_dir against --resume and --max_steps): made on every rank
    once the ranks have started."""
    problems = cli.path_problems(rank, args.summary, reads=[args.deepspeed, *args.data, args.tokenizer, args.model],
                                 output_dirs=[("--output_dir", args.output_dir)], checkpoints=[args.output_dir],
                                 data=args.data)
    steps = trainer_checkpoints(args.output_dir)
    if steps and not args.resume:  # the Trainer would replace them one by one, mixing two runs
        names = [f"checkpoint-{n}" for n in sorted(steps)]
        problems.append(f"--output_dir {args.output_dir!r} already holds checkpoints ({', '.join(names[:3])}"
                        f"{', ...' if len(names) > 3 else ''}): continue that run with --resume, or choose another "
                        "--output_dir")
    if args.resume and not steps:  # else found after the data, the model and DeepSpeed's start
        problems.append(f"--resume: --output_dir {args.output_dir!r} holds no checkpoint-N folder to resume from")
    if args.resume and steps and args.max_steps <= max(steps):  # the Trainer would still take a step, and save it
        problems.append(f"--max_steps {args.max_steps}: the last checkpoint in --output_dir is at step {max(steps)}; "
                        f"pass --max_steps > {max(steps)} to train on")
    return problems


def trainer_checkpoints(output_dir: str) -> List[int]:
    """The steps of the ``checkpoint-N`` folders in ``output_dir``, as the Trainer's own
    ``get_last_checkpoint`` finds them (folders named exactly so)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    found = (re.fullmatch(PREFIX_CHECKPOINT_DIR + r"-(\d+)", n) for n in names)
    return [int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(output_dir, m.group(0)))]


def resume_problems(last: str, ds_config: Dict) -> List[str]:
    """What stops the Trainer's DeepSpeed loading of ``last`` (a ``checkpoint-N``), as
    ``launch/train.py`` checks it: a ZeRO checkpoint of another world size (how to convert it), a
    missing or damaged rank file, another ZeRO stage or precision. DeepSpeed's own error named no
    conversion; a rank file that failed on one rank left the others waiting. None for a universal
    load (DeepSpeed checks that layout) or a model-only checkpoint (no ``latest``)."""
    import torch.distributed as dist

    if not os.path.isfile(os.path.join(last, "latest")) or (ds_config.get("checkpoint") or {}).get("load_universal"):
        return []
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    return checkpoint_problems(last, world_size=dist.get_world_size() if dist.is_initialized() else 1,
                               zero_stage=stage if isinstance(stage, int) else None,
                               bf16=bf16_enabled(ds_config))


class LogLastStep(TrainerCallback):
    """Log the loss at the last step too: ``logging_steps`` need not divide it, and a resumed run's
    steps may all fall between two logging steps (its output named a loss of the earlier run)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


def main() -> None:
    args = parse_args()

    from deepspeed.accelerator import get_accelerator
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    # the group first (accelerate reuses it; under mpirun it reads rank, world and address from the env
    # only, which mpi4py finds), so a problem on one node only stops every rank
    _, rank = init_distributed()
    cli.exit_on_path_problems(lambda: path_problems(args, rank), ("--output_dir", args.output_dir))
    ds_config, bitter7 = cli.read_ds_config(args.deepspeed, "launch/train_hf_trainer.py --deepspeed", trainer=True)  # before any work
    tokenizer = cli.build_or_exit("loading the tokenizer", dsdata.get_tokenizer, args.tokenizer)
    train, _ = cli.build_or_exit("building the data", lambda: dsdata.build_lm_datasets(
        args.data, tokenizer, args.seq_len, seed=args.seed, hub_config=args.data_config))
    model = cli.build_or_exit("building the model", lambda: modeling.build_model(
        args.model, dsdata.tokenizer_vocab_size(tokenizer), seed=args.seed, max_positions=max(args.seq_len, 256),
        overrides=args.model_overrides, eos_token_id=dsdata.eos_id(tokenizer)))
    last = get_last_checkpoint(args.output_dir) if args.resume else None  # the folder the Trainer resumes from
    mismatch, problem = None, None
    try:
        mismatch = modeling.model_mismatch(modeling.saved_model_config(last), model.config) if last else None
    except ValueError as err:  # its config.json cannot be read (a node's copy may differ)
        problem = f"cannot resume from {last!r}: {err}"
    cli.exit_on_every_rank(problem, elsewhere=f"another rank cannot read the model config in {last!r}")
    if mismatch:  # alike on every rank; DeepSpeed's loading would fail with a size-mismatch traceback
        raise SystemExit(f"cannot resume from {last!r}: its model (config.json) has {mismatch}: pass the "
                         "training run's --model, --model_overrides and --tokenizer")
    problems = resume_problems(last, ds_config) if last else []
    cli.exit_on_every_rank(f"cannot resume from {last!r}: {'; '.join(problems)}" if problems else None,
                           elsewhere=f"another rank cannot resume from {last!r}")
    problem = modeling.seq_len_problem(args.seq_len, model.config)
    if problem:  # alike on every rank
        raise SystemExit(problem)
    prepare_model(model, bitter7)  # before DeepSpeed flattens the parameters (the section is checked above)
    training_args = TrainingArguments(
        output_dir=args.output_dir, deepspeed=ds_config, max_steps=args.max_steps,
        save_steps=args.save_steps, save_strategy="steps", logging_steps=min(10, args.max_steps), report_to=[],
        seed=args.seed, dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=get_accelerator().device_name() == "cpu",  # else accelerate on CPU: every rank a world of one
        **trainer_settings(ds_config))
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      data_collator=collate)
    callback = Bitter7Callback(trainer)
    trainer.add_callback(callback)
    trainer.add_callback(LogLastStep())
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    # trainer.evaluate() is not called: on CPU/gloo, accelerate's gather_for_metrics fails inside
    # DeepSpeed's comm layer ("ProcessGroupGloo::allgather: invalid output tensor list").
    step = trainer.state.global_step
    loss = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h and h.get("step") == step), None)
    pruner = callback.pruner
    if trainer.is_world_process_zero():
        if pruner is not None:
            print(pruner.format_report())
        print(f"train loss at step {step}: {loss if loss is not None else float('nan'):.4f}")
        if args.summary:
            summary = {"steps": step, "train_loss": loss,
                       "world_size": trainer.args.world_size,
                       "pruning": pruner is not None,
                       "layers": pruner.sparsity_report() if pruner is not None else [],
                       "step_count": getattr(pruner, "step_count", None)}
            os.makedirs(os.path.dirname(os.path.abspath(args.summary)), exist_ok=True)
            with open(args.summary, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
    # Shut the process group down in order: left to interpreter exit, a rank could abort
    # ("terminate called without an active exception") while the other was still running.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    with abort_job_on_error():  # under mpirun, a rank that fails alone stops the job
        main()
