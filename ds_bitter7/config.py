"""The ``"bitter7"`` section of a DeepSpeed JSON config.

Parsed with DeepSpeed's own config base class (extra keys forbidden), from the same dict or JSON
path that ``deepspeed.initialize`` receives. Every problem is reported at once, in one
``ValueError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from enum import Enum
from typing import Any, List, Optional, Union

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import (
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

SECTION = "bitter7"


class ScoreName(str, Enum):
    bitter7 = "bitter7"
    magnitude = "magnitude"
    movement = "movement"
    fisher = "fisher"
    bitter7_variance = "bitter7_variance"
    fluctuation = "fluctuation"
    obs = "obs"
    bitter7_obs = "bitter7_obs"


class StructureName(str, Enum):
    mlp_neuron = "mlp_neuron"
    attention_head = "attention_head"
    unstructured = "unstructured"


def enum_name(value) -> str:
    """The plain name of a config enum (DeepSpeed's config models store enum values)."""
    return value.value if isinstance(value, Enum) else str(value)


class Scope(str, Enum):
    global_ = "global"
    per_layer = "per_layer"
    standardized = "standardized"


class Shape(str, Enum):
    cubic = "cubic"
    linear = "linear"


class StatsSource(str, Enum):
    calibration = "calibration"
    training = "training"


class CompensationMode(str, Enum):
    mean = "mean"
    least_squares = "least_squares"


class MaskUpkeep(str, Enum):
    gradient = "gradient"
    state = "state"


class ScheduleConfig(DeepSpeedConfigModel):
    """When pruning events happen and how far each one goes."""

    start_step: StrictInt = Field(0, ge=0)
    """Optimizer step of the first event; nothing is pruned before it."""
    end_step: StrictInt = Field(0, ge=0)
    """Optimizer step of the last event, where ``target_sparsity`` is reached."""
    frequency: StrictInt = Field(100, ge=1)
    """Steps between events."""
    shape: Shape = Shape.cubic
    """Sparsity curve between start and end: ``target * progress**3`` (cubic) or linear."""

    @model_validator(mode="after")
    def _end_after_start(self):
        if self.end_step < self.start_step:
            raise ValueError(
                f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")
        return self


class BiasCompensationConfig(DeepSpeedConfigModel):
    """Fold removed units' mean activation into the next layer (README: Bias compensation)."""

    enabled: StrictBool = False
    """Compensate the next layer for every unit pruned at an event."""
    source: StatsSource = StatsSource.calibration
    """``calibration``: the ``calibration_data`` given to ``initialize``; ``training``: the
    training forward passes in a window before each event."""
    mode: CompensationMode = CompensationMode.mean
    """``mean``: ``b += W[:, i] * mu_i``; ``least_squares``: refit the next layer on kept units."""
    num_batches: StrictInt = Field(8, ge=1)
    """Calibration batches run before each event (source ``calibration``)."""
    window: StrictInt = Field(8, ge=1)
    """Optimizer steps whose training forward passes (every micro-batch) are observed before each
    event (source ``training``)."""
    ridge: StrictFloat = Field(1e-3, ge=0.0, allow_inf_nan=False)
    """Ridge damping of least squares, relative to the mean diagonal of the covariance."""
    layers_per_pass: StrictInt = Field(0, ge=0)
    """Source ``calibration``, with the ``F x F`` matrices (least squares, ``obs``,
    ``bitter7_obs``): sum the matrices of at most this many layers per calibration pass, so a
    rank never holds every layer's at once (one pass per chunk of layers for the score's greedy,
    whose ranks keep only the layers they order, and one per chunk for the refit: more forward
    passes, the same result). ``0``: every layer in one pass."""

    @model_validator(mode="after")
    def _passes_need_calibration(self):
        if self.layers_per_pass and self.source == StatsSource.training:
            raise ValueError("layers_per_pass runs calibration passes; source 'training' sums the "
                             "training forwards, which cannot be run again (use source 'calibration', "
                             "or layers_per_pass 0)")
        return self


class Bitter7Config(DeepSpeedConfigModel):
    """The ``"bitter7"`` section."""

    enabled: StrictBool = True
    """Switch the pruner on; a config without the section leaves it off."""
    score: ScoreName = ScoreName.bitter7
    """Importance: per weight bitter7, magnitude, movement, fisher or bitter7_variance; per unit
    fluctuation (FLAP), obs (greedy least-squares reconstruction order, ``obs.py``) or bitter7_obs
    (obs with each output's error weighted by Adam's second moment: the loss's sensitivity)."""
    structures: List[StructureName] = Field(default_factory=lambda: [StructureName.mlp_neuron],
                                            min_length=1)
    """Unit types to prune; each type has its own threshold."""
    target_sparsity: StrictFloat = Field(0.5, ge=0.0, lt=1.0)
    """Fraction of units of each type removed at the end of the schedule, in [0, 1)."""
    scope: Scope = Scope.global_
    """``global``: one threshold per type over all layers; ``per_layer``: the same fraction in
    every layer (exports to a standard architecture); ``standardized``: one global threshold over
    scores standardised per layer (FLAP's adaptive structure search: each layer's unpruned units
    are scaled to mean 0, std 1, so layers whose scores differ in scale compete on rank)."""
    min_units_per_layer: StrictInt = Field(1, ge=0)
    """With global or standardized scope, the units each layer keeps whatever their scores (a layer with no
    attention head left cannot be exported as a standard model)."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Pruning schedule."""
    bias_compensation: BiasCompensationConfig = Field(default_factory=BiasCompensationConfig)
    """Bias compensation of removed units."""
    mask_upkeep: MaskUpkeep = MaskUpkeep.gradient
    """How pruned elements stay zero between events: ``gradient`` zeroes their fp32 gradient before
    every optimizer step (one tensor; exact for Adam/AdamW, whose update of a zero weight with zero
    moments and zero gradient is zero); ``state`` re-zeroes the fp32 masters and every moment after
    every step (three tensors; for optimizers that move a weight whose gradient is zero)."""
    eps: StrictFloat = Field(1e-8, gt=0.0, allow_inf_nan=False)
    """Added to ``exp_avg_sq`` before the power."""
    exponent: StrictFloat = Field(0.25, gt=0.0, allow_inf_nan=False)
    """Power applied to ``exp_avg_sq + eps`` (the fourth root by default)."""

    @field_validator("structures")
    @classmethod
    def _unique(cls, value: List[StructureName]) -> List[StructureName]:
        if len(set(value)) != len(value):
            raise ValueError(f"structures must not repeat a type, got {[getattr(v, 'value', v) for v in value]}")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> Bitter7Config:
        """Score, scope, structures and compensation that do not go together: every such problem
        in one error (pydantic stops at the first validator that raises)."""
        from .scores import get_scorer  # scores imports this module's ScoreName

        scorer = get_scorer(self.score)
        score, scope = enum_name(self.score), enum_name(self.scope)
        kinds = [enum_name(s) for s in self.structures]
        problems = []
        if scope == "standardized" and "unstructured" in kinds:
            problems.append("scope 'standardized' ranks whole units per layer; it does not apply to "
                            "'unstructured' (use 'global' or 'per_layer')")
        if scorer.kind_fn is not None and scope == "standardized":
            problems.append(f"score {score!r} ranks units by the step a greedy removal takes them; "
                            "standardizing ranks per layer is meaningless (use scope 'global' or 'per_layer', or another score "
                            "such as 'fluctuation')")
        if scorer.fn is None and "unstructured" in kinds:  # no per-weight score
            problems.append(f"score {score!r} scores whole units; it does not apply to structures "
                            "['unstructured'] (prune unstructured weights in a run with a per-weight score "
                            "such as 'bitter7')")
        if kinds == ["unstructured"] and self.bias_compensation.enabled:
            problems.append("bias_compensation folds removed units into the next layer; structures "
                            "['unstructured'] removes no units (disable it, or add mlp_neuron / attention_head)")
        if kinds == ["unstructured"] and scorer.times_unit_std:
            problems.append(f"score {score!r} scores whole units by their activations; it does "
                            "not apply to structures ['unstructured'] (use 'bitter7')")
        if problems:  # one line each (``_describe`` splits them): the count says how many
            raise ValueError("\n".join(problems))
        return self


def _describe(error: dict) -> str:
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        msg = "unknown key"
    if error["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    allowed = (error.get("ctx") or {}).get("expected")
    if allowed and str(allowed) not in msg:
        msg = f"{msg} (allowed: {allowed})"
    if not error["loc"]:  # a check across keys (one line per problem): the section's value would be every key
        return "\n".join(f"  {SECTION}: {line}" for line in msg.splitlines())
    loc = ".".join(str(p) for p in error["loc"])
    return f"  {SECTION}.{loc} = {error.get('input')!r}: {msg}"


def load_ds_config(config: Union[str, os.PathLike, dict]) -> dict:
    """The DeepSpeed config as a dict, from a dict or a JSON file path."""
    if isinstance(config, dict):
        return config
    path = os.fspath(config)
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {path} holds a JSON {type(loaded).__name__}, not an object")
    return loaded


def parse_config(config: Union[str, os.PathLike, dict, Any]) -> Bitter7Config:
    """Parse the ``"bitter7"`` section of a DeepSpeed config (dict or JSON path).

    A missing section gives a disabled config. Raises one ``ValueError`` listing every bad key.
    """
    ds_config = load_ds_config(config)
    if SECTION in ds_config and ds_config[SECTION] is None:  # not the same as leaving it out: say so
        raise ValueError(f"Invalid '{SECTION}' config: null (leave the section out, or set \"enabled\": false)")
    section = ds_config.get(SECTION)
    if section is None:
        near = [k for k in ds_config if k != SECTION and "".join(c for c in k.lower() if c.isalnum()) == SECTION]
        if near:
            raise ValueError(f"DeepSpeed config has a section {near[0]!r}, not {SECTION!r}: pruning would be off")
        return Bitter7Config(enabled=False)
    if not isinstance(section, dict):
        raise ValueError(f"Invalid '{SECTION}' config: expected an object, got {section!r}")
    try:
        return Bitter7Config(strict=True, **section)
    except ValidationError as e:
        errors = e.errors()
    lines = [line for err in errors for line in _describe(err).splitlines()]  # one per problem
    # Checks across keys (end_step >= start_step, score / structure combinations) run only once
    # every key of their model is valid: run them again with the bad keys at their defaults (a
    # nested model's check failing hides the outer ones: again), to name them all now.
    bad = [err["loc"] for err in errors]
    for _ in range(3):
        removed = list(bad)
        try:
            Bitter7Config(strict=True, **_without(section, removed))
            break
        except ValidationError as e:
            for err in e.errors():  # shown with the user's own value, not the stripped copy
                bad.append(err["loc"])
                if err["type"] == "value_error":  # each problem of a check across keys on its own
                    kept = [m for m in err["msg"].splitlines() if not _reads_a_default(err, removed, m)]
                    if not kept:
                        continue  # about a default put in for a bad key, not the user's value
                    err = dict(err, msg="\n".join(kept), input=_at(section, err["loc"]))
                for line in _describe(err).splitlines():
                    if line not in lines:
                        lines.append(line)
    raise ValueError(f"Invalid '{SECTION}' config ({len(lines)} problem(s)):\n" + "\n".join(lines)) from None


def _reads_a_default(err: dict, removed: List[tuple], msg: str) -> bool:
    """Whether ``msg``, one problem of a check across keys, names a key of its own model that was
    replaced by its default."""
    loc = tuple(err["loc"])
    return any(tuple(r[:len(loc)]) == loc and len(r) > len(loc) and isinstance(r[len(loc)], str)
               and r[len(loc)] in msg for r in removed)


def _at(section: dict, loc: tuple) -> Any:
    node = section
    for key in loc:
        node = node.get(key) if isinstance(node, dict) and isinstance(key, str) else node
    return node


def _without(section: dict, locations: List[tuple]) -> dict:
    """A copy of ``section`` without the keys at ``locations`` (a list item: the whole list)."""
    out = copy.deepcopy(section)
    for loc in locations:
        keys = list(itertools.takewhile(lambda k: isinstance(k, str), loc))
        node = out
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if keys and isinstance(node, dict):
            node.pop(keys[-1], None)
    return out


def _object(value, name: str, example: str, problems: List[str]) -> dict:
    """``value`` where it is a JSON object (None: an empty one), else ``{}`` and a problem."""
    if value is None or isinstance(value, dict):
        return value or {}
    problems.append(f"  {name} = {value!r}: must be a JSON object, such as {example}")
    return {}


def _flag(value) -> bool:
    """A DeepSpeed boolean as DeepSpeed reads it (pydantic: "true", "1", "on", ... are true)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "t", "yes", "y", "on")
    return bool(value)


def bf16_enabled(ds_config: dict) -> Optional[bool]:
    """The ``enabled`` flag of a DeepSpeed config's bf16 section (``bf16``, or its other name
    ``bfloat16``, read where ``bf16`` is absent, as DeepSpeed does): False without one, None where
    it is not a boolean."""
    section = ds_config.get("bf16") if "bf16" in ds_config else ds_config.get("bfloat16", {})
    section = {} if section is None else section
    enabled = section.get("enabled", False) if isinstance(section, dict) else None
    return enabled if isinstance(enabled, bool) else None


def check_deepspeed_support(ds_config: dict) -> None:
    """Refuse DeepSpeed settings the pruner cannot serve, before anything is built."""
    problems: List[str] = []
    zero = ds_config.get("zero_optimization")
    if isinstance(zero, bool):  # DeepSpeed's deprecated form: true means stage 1
        zero = {"stage": 1 if zero else 0}
    zero = _object(zero, "zero_optimization", '{"stage": 2}', problems)
    stage = zero.get("stage", 0)
    for dtype in ("fp16", "bf16", "bfloat16"):  # bfloat16: DeepSpeed's other name for the bf16 section
        section = _object(ds_config.get(dtype), dtype, '{"enabled": true}', problems)
        if stage == 0 and _flag(section.get("enabled", False)):
            problems.append(f"  {dtype}.enabled with zero_optimization.stage = 0: ds_bitter7 reads the fp32 "
                            f"master weights DeepSpeed keeps at ZeRO stage 1 and 2; use stage 1 or 2 for {dtype}")
    if isinstance(stage, bool) or stage not in (0, 1, 2):
        problems.append(f"  zero_optimization.stage = {stage!r}: " + ("ds_bitter7 supports ZeRO stage 0, 1 and 2"
                        if isinstance(stage, int) and not isinstance(stage, bool) else "must be the integer 0, 1 or 2"))
    for key in ("offload_optimizer", "offload_param"):
        device = _object(zero.get(key), f"zero_optimization.{key}", '{"device": "none"}', problems).get("device", "none")
        if device not in (None, "none"):
            problems.append(f"  zero_optimization.{key}.device = {device!r}: "
                            "CPU/NVMe offload is not supported yet (allowed: 'none')")
    for key in ("cpu_offload", "cpu_offload_param"):  # DeepSpeed's deprecated forms of the two above
        if _flag(zero.get(key, False)):
            problems.append(f"  zero_optimization.{key} = true: CPU offload is not supported yet")
    if _flag(zero.get("round_robin_gradients", False)):  # DeepSpeed maps parameters to the wrong master elements
        problems.append("  zero_optimization.round_robin_gradients = true: DeepSpeed's fp32 master mapping "
                        "(_hp_mapping) does not hold under it, so masks would land on other weights; set it false")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds_config.get(key)  # read before DeepSpeed by the launch scripts (data, calibration batches)
        if value not in (None, "auto") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"  {key} = {value!r}: must be a positive integer (\"auto\" with the HF Trainer, or left out)")
    optimizer = ds_config.get("optimizer")
    kind = str(optimizer.get("type", "")).lower() if isinstance(optimizer, dict) else ""
    if kind == "muon" and stage in (1, 2):
        problems.append(f"  optimizer.type = {optimizer['type']!r} with ZeRO stage {stage}: DeepSpeed keeps Muon's "
                        "momentum per whole parameter, outside the partition ds_bitter7 keeps at zero, so pruned "
                        "units' momentum would still move the kept ones; use an Adam-type optimizer")
    if problems:
        raise ValueError("DeepSpeed config not supported by ds_bitter7:\n" + "\n".join(problems))


def optimizer_problems(ds_config: dict) -> List[str]:
    """What in a DeepSpeed config's ``optimizer`` and ``scheduler`` sections DeepSpeed (or the HF
    Trainer's reading of them) would fail on with a traceback naming no key: a section or its
    ``params`` that is not an object, ``betas`` that are not two numbers."""
    problems = []
    for section in ("optimizer", "scheduler"):
        value = ds_config.get(section)
        if value is not None and not isinstance(value, dict):
            problems.append(f"  {section} = {value!r}: an object is expected ({{\"type\": ..., \"params\": {{...}}}})")
        elif value is not None and not isinstance(value.get("params", {}), dict):
            problems.append(f"  {section}.params = {value['params']!r}: an object is expected")
    optimizer = ds_config.get("optimizer")
    params = optimizer.get("params") if isinstance(optimizer, dict) else None
    betas = params.get("betas", "auto") if isinstance(params, dict) else "auto"
    numbers = isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
        b == "auto" or (isinstance(b, (int, float)) and not isinstance(b, bool)) for b in betas)
    if betas != "auto" and not numbers:
        problems.append(f"  optimizer.params.betas = {betas!r}: two numbers are expected, such as [0.9, 0.999]")
    return problems


def check_same_on_every_rank(cfg: Bitter7Config, group=None) -> None:
    """``ValueError`` on every rank of ``group`` (default: the world) when their parsed
    ``"bitter7"`` sections differ (a node with another config file): their masks would split, or
    their collectives wait on each other for good. Collective over ``group`` (nothing without a
    process group)."""
    from .comm import Communicator

    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    if not Communicator(group).same(text):
        raise ValueError(f"ds_bitter7: the ranks' \"bitter7\" config sections differ (this rank's, as parsed: {text}); "
                         "every rank must be given the same config")
