"""The one door to DeepSpeed's optimizer internals.

Everything else asks this module for "the local fragment of parameter P": a flat range of
``P.view(-1)`` whose fp32 master weights and Adam moments this rank owns, as views into
DeepSpeed's own flat partitions (nothing is copied or gathered).

Supported (DeepSpeed 0.19.8): ZeRO stage 1/2 (``DeepSpeedZeroOptimizer``: fp32, bf16, fp16),
``BF16_Optimizer`` (bf16 with ``grad_accum_dtype: fp32``) and stage 0 in fp32 (the client's torch
optimizer on the model's own parameters). ZeRO-3, offload and stage-0 fp16 are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set

import torch
from torch import nn

ADAM_SECOND_MOMENT = "exp_avg_sq"


class MissingOptimizerState(RuntimeError):
    """The optimizer has no state to score with (no step taken yet, or not an Adam optimizer)."""


@dataclass
class Fragment:
    """This rank's fp32 master range of one model parameter."""

    name: str
    param: nn.Parameter  # the model's own (bf16/fp16/fp32) parameter
    start: int  # offset of the range in param.view(-1)
    numel: int
    group: int  # optimizer param-group index
    flat: torch.Tensor  # the fp32 tensor that holds the range and keys the optimizer state
    # (DeepSpeed's flat partition, or at stage 0 the parameter itself)
    flat_start: int  # offset of the range in flat.view(-1)

    def narrow(self, t: torch.Tensor, start: Optional[int] = None, numel: Optional[int] = None) -> torch.Tensor:
        """The view of ``t`` (shaped like ``flat``) over [start, start+numel) of the parameter."""
        start = self.start if start is None else start
        numel = self.numel if numel is None else numel
        return t.view(-1).narrow(0, self.flat_start + start - self.start, numel)


def _optimizer_kind(optimizer) -> str:
    name = type(optimizer).__name__
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        if getattr(optimizer, "cpu_offload", False):
            raise ValueError("ds_bitter7 does not support ZeRO optimizer offload yet")
        return "zero"
    if hasattr(optimizer, "fp32_groups_flat_partition"):
        return "bf16"
    if "Stage3" in name or hasattr(optimizer, "fp16_partitioned_groups_flat"):
        raise ValueError("ds_bitter7 supports ZeRO stage 0, 1 and 2; ZeRO-3 is not supported yet")
    if hasattr(optimizer, "fp32_groups_flat") or name.startswith("FP16"):
        raise ValueError(f"ds_bitter7 does not support {name} (DeepSpeed's optimizer for fp16 or bf16 at ZeRO "
                         "stage 0); use ZeRO stage 1/2 for fp16/bf16 training")
    if isinstance(optimizer, torch.optim.Optimizer):
        return "torch"
    raise ValueError(f"ds_bitter7 does not support the DeepSpeed optimizer wrapper {name}")


class ZeroAccess:
    """Local fragments of a DeepSpeed engine's parameters, and hooks on its base optimizer."""

    def __init__(self, engine, names: Iterable[str]):
        self.engine = engine
        self.optimizer = engine.optimizer
        if self.optimizer is None:
            raise ValueError("ds_bitter7 needs an optimizer: pass one to initialize or configure "
                             "an 'optimizer' section")
        self.kind = _optimizer_kind(self.optimizer)
        self.base = self.optimizer if self.kind == "torch" else self.optimizer.optimizer
        self._names = {id(p): n for n, p in engine.module.named_parameters()}
        wanted = set(names)
        self.fragments: Dict[str, Fragment] = {}
        self.in_optimizer: Set[str] = set()  # the names in some optimizer param group (this rank's fragment or not)
        if self.kind == "torch":
            self._flats = None
            self._init_torch(wanted)
        else:
            self._flats = (self.optimizer.single_partition_of_fp32_groups if self.kind == "zero"
                           else self.optimizer.fp32_groups_flat_partition)
            groups = self.optimizer.bit16_groups if self.kind == "zero" else self.optimizer.bf16_groups
            self._init_mapped(groups, wanted)

    # -- construction ---------------------------------------------------------------------------
    def _init_mapped(self, groups: Sequence[Sequence[nn.Parameter]], wanted: set) -> None:
        for g, params in enumerate(groups):
            for p in params:
                name = self._names.get(id(p))
                mapping = getattr(p, "_hp_mapping", None)
                if name in wanted:
                    self.in_optimizer.add(name)
                if name not in wanted or mapping is None:
                    continue
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                self.fragments[name] = Fragment(name, p, lp.start, lp.numel, g, self._flats[g], hp.start)

    def _init_torch(self, wanted: set) -> None:
        for g, group in enumerate(self.base.param_groups):
            for p in group["params"]:
                name = self._names.get(id(p))
                if name not in wanted:
                    continue
                self.in_optimizer.add(name)
                if p.dtype != torch.float32:
                    raise ValueError(f"ds_bitter7 at ZeRO stage 0 needs fp32 parameters, {name} is {p.dtype}")
                self.fragments[name] = Fragment(name, p, 0, p.numel(), g, p, 0)

    def local_numel(self) -> int:
        """Elements of this rank's fp32 master partition (all of the model at stage 0)."""
        if self.kind == "torch":
            return sum(p.numel() for g in self.base.param_groups for p in g["params"])
        return sum(f.numel() for f in self._flats)

    @property
    def replicated(self) -> bool:
        """Stage 0: every rank holds all of the state, so scores need no all-reduce."""
        return self.kind == "torch"

    # -- reading and writing fragments -----------------------------------------------------------
    def master(self, frag: Fragment) -> torch.Tensor:
        """The fp32 master weights of the fragment (a writable view)."""
        return frag.narrow(frag.flat.data)

    def state(self, frag: Fragment, key: str = ADAM_SECOND_MOMENT) -> torch.Tensor:
        """A view of optimizer state ``key`` over the fragment; raises when it does not exist."""
        st = self.base.state.get(frag.flat, {})
        if key not in st:
            raise MissingOptimizerState(
                f"optimizer state '{key}' does not exist for {frag.name} (optimizer "
                f"{type(self.base).__name__}): take at least one optimizer step first, or use an "
                "Adam-type optimizer; 'magnitude' needs no optimizer state")
        return frag.narrow(st[key])

    def moment_views(self, frag: Fragment) -> List[torch.Tensor]:
        """Views of every per-element optimizer state tensor (exp_avg, exp_avg_sq, ...)."""
        st = self.base.state.get(frag.flat, {})
        size = frag.flat.numel()
        return [frag.narrow(v) for v in st.values() if torch.is_tensor(v) and v.numel() == size and v.dim() > 0]

    def grad(self, frag: Fragment) -> Optional[torch.Tensor]:
        """The fragment's fp32 gradient, valid inside the optimizer step (pre-hook)."""
        g = frag.flat.grad
        return None if g is None else frag.narrow(g)

    def update_lp_params(self) -> None:
        """Copy fp32 masters to the model's parameters and all-gather them (DeepSpeed's own path).

        Collective: every rank must call this, in the same order.
        """
        if self.kind != "torch":
            self.optimizer.update_lp_params()

    # -- hooks -----------------------------------------------------------------------------------
    def _stepping_groups(self, optimizer) -> List[int]:
        if self.kind == "torch":
            return list(range(len(self.base.param_groups)))
        ids = {id(g["params"][0]) for g in optimizer.param_groups if g["params"]}
        return [i for i, flat in enumerate(self._flats) if id(flat) in ids]

    @property
    def n_groups(self) -> int:
        return len(self.base.param_groups) if self.kind == "torch" else len(self._flats)

    def register_step_hooks(self, pre: Callable[[List[int]], None], post: Callable[[List[int]], None]):
        """Call ``pre(groups)``/``post(groups)`` around every base-optimizer step.

        ZeRO 1/2 step the base optimizer once per param group (groups in order); the others once
        for all. ``post`` runs before DeepSpeed copies fp32 masters to the model's parameters and
        all-gathers them, so writes there reach every rank's model with no extra communication.
        """
        h1 = self.base.register_step_pre_hook(lambda opt, args, kwargs: pre(self._stepping_groups(opt)))
        h2 = self.base.register_step_post_hook(lambda opt, args, kwargs: post(self._stepping_groups(opt)))
        return [h1, h2]
