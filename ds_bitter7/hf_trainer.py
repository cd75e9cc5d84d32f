"""Hugging Face ``Trainer`` integration.

``Trainer`` builds the DeepSpeed engine itself and calls ``engine.step()`` inside
``accelerator.backward``, so the pruner is attached to that engine when training begins (its
optimizer hooks then run inside every step), and its state is written beside each checkpoint
(``Trainer`` hands back no ``client_state``; the DeepSpeed checkpoint's copy of the state is read
when that file is missing)::

    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"), ...)
    trainer.add_callback(Bitter7Callback(trainer))
    trainer.train()

The ``"bitter7"`` section lives in the same DeepSpeed config; it must not contain ``"auto"``
(accelerate rejects unresolved ``"auto"`` values).
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Iterable, Optional, Tuple

from transformers import TrainerCallback

from . import prepare_model  # noqa: F401  (re-exported: call it before Trainer(...))
from .calibration import needs_stats
from .checkpoint_files import ExportError, saved_pruner_state
from .comm import Communicator, is_main_process, world_size_and_rank
from .config import enum_name
from .export import write_remote_code
from .state import TRAINER_FILE as STATE_FILE
from .state import (
    CheckpointError,
    atomic_save,
    latest_tag,
    restore_local,
)

logger = logging.getLogger(__name__)


def rank_rows(dataset: Iterable, n: int, world: int, rank: int) -> list:
    """``n`` rows of ``dataset`` for ``rank`` of ``world``: row ``rank``, then every ``world``-th."""
    return list(itertools.islice(iter(dataset), rank, n * world, world))


class Bitter7Callback(TrainerCallback):
    """Attach ds_bitter7 to the DeepSpeed engine a ``Trainer`` builds; save/restore its state.

    Args:
        trainer: the ``Trainer`` (its engine, ``trainer.model_wrapped``, exists only once
            training starts, and callbacks are not handed it).
        ds_config: the DeepSpeed config (dict or path) holding the ``"bitter7"`` section;
            default: the one given to ``TrainingArguments(deepspeed=...)``.
        calibration_data: batches for bias compensation (dicts of model inputs); default: the
            first rows of the training set, each rank its own (``rank_rows``), collated by the
            trainer's data collator.
        resume_from_checkpoint: checkpoint folder to load the pruner state from; default: the
            ``checkpoint-{global_step}`` folder when training starts at a step > 0.
    """

    def __init__(self, trainer, ds_config: Any = None, calibration_data: Optional[Iterable] = None,
                 resume_from_checkpoint: Optional[str] = None):
        self.trainer = trainer
        self.ds_config = ds_config
        self.calibration_data = calibration_data
        self.resume_from_checkpoint = resume_from_checkpoint
        self.pruner = None

    def _config(self, args) -> Any:
        if self.ds_config is not None:
            return self.ds_config
        hf_cfg = getattr(args, "hf_deepspeed_config", None)
        if hf_cfg is not None:
            return hf_cfg.config
        if args.deepspeed is None:
            raise ValueError("Bitter7Callback needs TrainingArguments(deepspeed=...) or ds_config=")
        return args.deepspeed

    def _default_calibration(self, engine, num_batches: int) -> list:
        """``num_batches`` batches from the start of the training set (map-style or iterable), each
        rank its own rows (row ``rank``, then every ``world``-th: the statistics are all-reduced, so
        the same rows on every rank would count each one ``world`` times), with only the model
        inputs the calibration forwards take (a leftover text column would not collate)."""
        ds = self.trainer.train_dataset
        bs = self.trainer.args.per_device_train_batch_size
        rows = [{k: row[k] for k in ("input_ids", "attention_mask") if k in row}
                for row in rank_rows(ds, bs * num_batches, *world_size_and_rank())]
        batches = []
        for i in range(0, len(rows), bs):
            batch = self.trainer.data_collator(rows[i:i + bs])
            batches.append({k: v.to(engine.device) for k, v in batch.items()
                            if k in ("input_ids", "attention_mask")})
        return batches

    def _calibration(self, engine, cfg) -> Optional[Iterable]:
        """The calibration batches for ``attach``: ``calibration_data``, else the default ones where
        the parsed config ``cfg`` needs them (compensation, or the score). Collective: a rank left
        without a row fails every rank (attach refused the "empty container" of an argument the user
        never gave); a rank whose config differs takes no default, and attach names the difference."""
        default = (cfg.enabled and self.calibration_data is None and needs_stats(cfg)
                   and enum_name(cfg.bias_compensation.source) == "calibration")
        calib = self._default_calibration(engine, cfg.bias_compensation.num_batches) if default else self.calibration_data
        if Communicator().any(default and not calib):
            raise ValueError(f"the training set has fewer rows than the {world_size_and_rank()[0]} ranks: the "
                             "calibration batches the callback takes from it (for bias compensation or the score) "
                             "need one per rank at least (more text, a shorter sequence length, or pass "
                             "calibration_data=)")
        return calib

    def on_train_begin(self, args, state, control, **kwargs):
        import ds_bitter7

        engine = self.trainer.model_wrapped
        if not hasattr(engine, "optimizer") or not hasattr(engine, "save_checkpoint"):
            raise RuntimeError("Bitter7Callback needs a DeepSpeed Trainer (TrainingArguments(deepspeed=...))")
        config = self._config(args)
        cfg = ds_bitter7.parse_config(config)
        self.pruner = ds_bitter7.get_pruner(engine)  # a second trainer.train(): the same engine and pruner
        if self.pruner is None:
            # on every rank, the section enabled or not: attach first checks that the ranks' agree
            self.pruner = ds_bitter7.attach(engine, config, calibration_data=self._calibration(engine, cfg))
        if not cfg.enabled:
            folder = self._resume_folder(args, state)
            if folder is not None and os.path.exists(os.path.join(folder, STATE_FILE)) and is_main_process():
                logger.warning("%s carries ds_bitter7 pruner state but this run's bitter7 section is disabled or "
                               "missing: its masks are not kept from here on and its checkpoints will not carry "
                               "them (export needs them)", folder)
            return control
        self._maybe_resume(args, state)
        return control

    def _maybe_resume(self, args, state) -> None:
        """Restore the pruner's replicated state and each rank's own (movement, unstructured masks)
        from the checkpoint the Trainer resumed from (DeepSpeed loaded it before the hooks existed).
        Collective: the state file is read and checked on every rank first, and a problem on any
        rank (a node without the file) fails them all before the per-rank restore."""
        folder = self._resume_folder(args, state)
        if folder is None:
            return
        comm = self.pruner.comm
        tag = latest_tag(folder)
        saved, path = comm.call(f"reading the pruner state in {folder}", self._read_state, folder, tag, state)
        self.pruner.load_state_dict(saved, source=path)
        if comm.any(tag is not None):  # every rank takes the same branch (its collectives must match)
            latest = os.path.join(folder, "latest")
            comm.raise_if_any(None if tag is not None else FileNotFoundError(f"{latest} exists on another node "
                                                                             "but not here"), f"reading {latest}")
            restore_local(self.pruner, os.path.join(folder, tag), saved)
        else:
            self.pruner.load_local_state_dict(None)  # re-derive from the weights that are exactly zero
        logger.info("bitter7 state restored from %s", path)

    def _resume_folder(self, args, state) -> Optional[str]:
        """The checkpoint folder this run resumed from (None for a fresh run): the callback's
        ``resume_from_checkpoint``, else ``output_dir/checkpoint-{global_step}``."""
        if self.resume_from_checkpoint is None and state.global_step > 0:
            return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return self.resume_from_checkpoint

    def _read_state(self, folder: str, tag: Optional[str], state) -> Tuple[dict, str]:
        """(the saved pruner state, its file), checked against the Trainer's step (local: no
        collective): the DeepSpeed checkpoint's copy of ``tag``, else ``bitter7_state.pt``
        (``checkpoint_files.saved_pruner_state``)."""
        try:
            saved, path = saved_pruner_state(folder, tag)
        except ExportError as err:  # a file that cannot be read: a checkpoint problem here, not an export's
            raise CheckpointError(str(err)) from None
        if path is not None and not isinstance(saved, dict):
            raise CheckpointError(f"{path} does not hold a bitter7 pruner state")
        if saved is None:
            state_file = os.path.join(folder, STATE_FILE)
            raise FileNotFoundError(
                f"resuming at step {state.global_step} but neither {state_file} nor a DeepSpeed checkpoint with a "
                "bitter7 state is there" + ("" if self.resume_from_checkpoint else
                                            "; when resuming from a checkpoint outside output_dir, pass it to "
                                            "the callback too: Bitter7Callback(..., resume_from_checkpoint=PATH)"))
        if saved.get("step") is not None and int(saved["step"]) > state.global_step:
            # the pruner counts optimizer steps taken (fp16 overflow skips do not count), so it can
            # lag the Trainer's global_step but never lead it: then the state is another run's
            raise CheckpointError(f"{path} is the pruner state of step {saved['step']}, but the Trainer resumed "
                                  f"at step {state.global_step}: pass the checkpoint it resumed from as "
                                  "Bitter7Callback(..., resume_from_checkpoint=PATH)")
        return saved, path

    def _model_type(self, model) -> Optional[str]:
        model = model if model is not None else self.trainer.model
        return getattr(getattr(model, "config", None), "model_type", None)

    def on_save(self, args, state, control, model=None, **kwargs):  # the DeepSpeed checkpoint holds the state too
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        # where the Trainer writes its own files: global rank 0, or every node's local rank 0 with
        # save_on_each_node (no shared file system: each node resumes from its own copy)
        writes = getattr(args, "should_save", is_main_process())
        model_type = self._model_type(model)
        if writes and model_type and os.path.isfile(os.path.join(folder, "config.json")):
            # a bitter7_* model (an export trained on) keeps its auto_map: its code goes beside it, as
            # in the export, or trust_remote_code could not load the checkpoint without ds_bitter7
            write_remote_code(folder, model_type)
        if self.pruner is None:
            return control
        state_dict = self.pruner.state_dict()  # replicated on every rank
        if writes:
            os.makedirs(folder, exist_ok=True)
            atomic_save(state_dict, os.path.join(folder, STATE_FILE))
        return control

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        """Before the Trainer uploads ``output_dir`` (with ``hub_strategy`` checkpoint, also the
        latest ``checkpoint-N``), which it does before ``on_save`` runs: a bitter7_* model's code
        goes there too, so the uploaded ``auto_map`` finds its module files."""
        model_type = self._model_type(model)
        if not model_type:
            return control
        write_remote_code(args.output_dir, model_type)  # its config.json is copied in after this
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isfile(os.path.join(folder, "config.json")):
            write_remote_code(folder, model_type)
        return control
