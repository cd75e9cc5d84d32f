"""ds_bitter7: ZeRO-aware structured pruning for DeepSpeed training.

``ds_bitter7.initialize`` takes the arguments of ``deepspeed.initialize`` (plus optional
calibration data), reads the ``"bitter7"`` section of the same config, and returns the same tuple;
``engine.step()`` then drives the pruning schedule.
"""

from __future__ import annotations

import copy
import logging
from typing import List, Optional

from . import models as models  # noqa: F401  (registers bitter7_gpt2 / bitter7_llama with the Auto classes)
from .comm import log_main, release_shm_buffers
from .config import (
    Bitter7Config,
    check_deepspeed_support,
    check_same_on_every_rank,
    enum_name,
    load_ds_config,
    parse_config,
)
from .structures import count_blocks, register_adapter

__all__ = [
    "initialize",
    "attach",
    "prepare_model",
    "get_pruner",
    "parse_config",
    "Bitter7Config",
    "register_adapter",
]

_ATTR = "_bitter7_pruner"
logger = logging.getLogger(__name__)


def _config_from(args, config, config_params):
    cfg = config if config is not None else config_params
    if cfg is None and args is not None:
        cfg = getattr(args, "deepspeed_config", None)
    if cfg is None:
        raise ValueError("ds_bitter7.initialize needs a DeepSpeed config (config=dict or JSON path)")
    return load_ds_config(cfg)


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, *, config=None, config_params=None, calibration_data=None, **kwargs):
    """``deepspeed.initialize`` with the bitter7 pruner attached when the config enables it.

    Same arguments (the first six by position, as DeepSpeed's; the rest, whose positions differ
    there, by keyword only) and return tuple ``(engine, optimizer, dataloader, lr_scheduler)``, plus
    ``calibration_data``: an iterable of model inputs (dicts of keyword arguments, or tensors)
    for bias compensation. A bad ``"bitter7"`` section raises ``ValueError`` on every rank before
    any collective.
    """
    import deepspeed
    import torch

    ds_config = _config_from(args, config, config_params)
    cfg = parse_config(ds_config)
    if cfg.enabled:
        check_deepspeed_support(ds_config)
        count_blocks(model)  # and its adapter: a model it cannot prune fails before DeepSpeed's start
        added = [model.get_parameter(n) for n in prepare_model(model, cfg)]
        if added and isinstance(model_parameters, (list, tuple)):  # a list built before the biases existed
            model_parameters = _with_params(model_parameters, added)
        if added and isinstance(optimizer, torch.optim.Optimizer):  # a client optimizer built before them
            _add_to_client_optimizer(optimizer, added)
    ds_only = {k: v for k, v in copy.deepcopy(ds_config).items() if k != "bitter7"}
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None  # the dict below is the config; DeepSpeed refuses both
    engine, opt, loader, sched = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, config=ds_only, **kwargs)
    release_shm_buffers()  # DeepSpeed's own start may have made them
    # the engine's data-parallel group knows the ranks that share it (an engine may live on a subgroup)
    check_same_on_every_rank(cfg, _dp_group(engine))
    if cfg.enabled:
        _attach(engine, cfg, calibration_data)
    return engine, opt, loader, sched


def prepare_model(model, config) -> List[str]:
    """Model changes the pruner needs before DeepSpeed flattens the parameters: a zero output bias
    for bias compensation in models without one (LLaMA). ``initialize`` calls it; call it yourself
    before ``Trainer(...)`` or ``deepspeed.initialize`` when you use ``attach`` (and build the
    optimizer's parameter list after it). Given the DeepSpeed config (not a parsed section), it
    also refuses the settings the pruner cannot serve (ZeRO-3, offload), before anything is built.
    Returns the names of the biases added."""
    cfg = config if isinstance(config, Bitter7Config) else parse_config(config)
    if cfg.enabled and not isinstance(config, Bitter7Config):
        check_deepspeed_support(load_ds_config(config))
    if cfg.enabled:
        _warn_if_unexportable(model, cfg)
    if cfg.enabled and cfg.bias_compensation.enabled:
        from .compensation import add_missing_out_biases

        return add_missing_out_biases(model, cfg)
    return []


def _warn_if_unexportable(model, cfg: Bitter7Config) -> None:
    """Said now, not when the export refuses it after training (``shrink.window_export_problem``)."""
    from .shrink import window_export_problem

    problem = window_export_problem(getattr(model, "config", None), [enum_name(k) for k in cfg.structures],
                                    enum_name(cfg.scope), cfg.bias_compensation.enabled)
    if problem:
        log_main("%s; training and the masked model are not affected", problem, level=logging.WARNING, log=logger)


def _add_to_client_optimizer(optimizer, new) -> None:
    """Put the ``new`` parameters into an existing param group of ``optimizer`` (one without weight
    decay where there is one): a new group would break an LR scheduler already bound to it."""
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in new if id(p) not in known]
    if new:
        group = next((g for g in optimizer.param_groups if not g.get("weight_decay")), optimizer.param_groups[0])
        group["params"].extend(new)


def _with_params(model_parameters, new):
    """``model_parameters`` (tensors or param-group dicts) plus the ``new`` parameters (no decay)."""
    if all(isinstance(p, dict) for p in model_parameters):
        return list(model_parameters) + [{"params": new, "weight_decay": 0.0}]
    return list(model_parameters) + new


def attach(engine, config, calibration_data=None):
    """Attach a pruner to an engine that already exists (e.g. the one HF Trainer built).

    ``config``: a parsed ``Bitter7Config``, or the DeepSpeed config (dict or path). Returns the
    pruner (None when disabled). Collective: every rank calls it with the same config (checked).
    """
    cfg = config if isinstance(config, Bitter7Config) else parse_config(config)
    check_same_on_every_rank(cfg, _dp_group(engine))
    if not cfg.enabled:
        return None
    if not isinstance(config, Bitter7Config):
        check_deepspeed_support(load_ds_config(config))
    return _attach(engine, cfg, calibration_data)


def _dp_group(engine):
    """The process group of the engine's data-parallel ranks (None: the whole world), as the pruner's."""
    return getattr(engine.optimizer, "dp_process_group", None)


def _attach(engine, cfg: Bitter7Config, calibration_data):
    from .pruner import Pruner
    from .state import install_checkpoint_hooks

    count_blocks(engine.module)
    if get_pruner(engine) is not None:
        raise ValueError("ds_bitter7: a pruner is already attached to this engine (ds_bitter7.initialize "
                         "attaches one when the config enables bitter7)")
    pruner = Pruner(engine, cfg, calibration_data)
    install_checkpoint_hooks(engine, pruner)
    setattr(engine, _ATTR, pruner)
    return pruner


def get_pruner(engine) -> Optional[object]:
    """The pruner attached to ``engine``, or None."""
    return getattr(engine, _ATTR, None)
