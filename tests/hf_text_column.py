"""A Trainer run in one process (no launcher) that test_trainer.py starts: the training set keeps
a text column, which the Trainer drops and the callback's default calibration batches must too
(DataCollatorForLanguageModeling cannot collate it). Its score reads activation statistics with
bias compensation off: the callback must build those batches for the score alone."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import datasets
from _launch_util import write_word_tokenizer
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from ds_bitter7 import data as dsdata
from ds_bitter7 import modeling
from ds_bitter7.hf_trainer import Bitter7Callback, prepare_model


def main(out: str) -> None:
    # a world of one on the port the test chose: without these, DeepSpeed's MPI discovery sets the
    # fixed default port 29500, which another process on the machine may hold
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    tokenizer = dsdata.get_tokenizer(str(write_word_tokenizer(Path(out) / "tok", 300)))
    tokenizer.pad_token = "w1"
    texts = [" ".join(f"w{(i * 7 + j) % 300}" for j in range(40)) for i in range(32)]
    train = datasets.Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"]), batched=True)  # keeps "text" beside input_ids and attention_mask
    model = modeling.build_model("tiny-gpt2", len(tokenizer), overrides={"n_layer": 2, "n_embd": 32})
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "zero_optimization": {"stage": 2}, "steps_per_print": 10**6,
                 "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
                 "bitter7": {"structures": ["mlp_neuron"], "target_sparsity": 0.5,
                             "schedule": {"start_step": 2, "end_step": 4, "frequency": 2},
                             "score": "bitter7_variance", "bias_compensation": {"enabled": False, "num_batches": 2}}}
    prepare_model(model, ds_config)
    args = TrainingArguments(output_dir=out, deepspeed=ds_config, max_steps=4, per_device_train_batch_size=2,
                             save_strategy="no", report_to=[], use_cpu=True, learning_rate=2e-3)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    callback = Bitter7Callback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    print("RESULT", json.dumps({"events": [e["step"] for e in callback.pruner.events],
                                "compensated": [e.get("compensation") for e in callback.pruner.events],
                                "sparsity": callback.pruner.events[-1]["sparsity"]}))


if __name__ == "__main__":
    main(sys.argv[1])
