"""Causal language models for training scripts: tiny built-ins, local directories, config names.

Models are randomly initialized from a config (seeded) unless a local directory with weights is
given. Nothing is downloaded except for a transformers config name (e.g. ``gpt2``), which needs
network access for its ``config.json`` only.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


def max_positions(config) -> Optional[int]:
    """The longest sequence the model's position table holds (GPT-2's ``n_positions``, LLaMA's
    ``max_position_embeddings``), or None when the config names neither."""
    return next((n for n in (getattr(config, k, None) for k in ("n_positions", "max_position_embeddings"))
                 if n is not None), None)


def seq_len_problem(seq_len: int, config, where: str = "") -> Optional[str]:
    """Why blocks of ``seq_len`` tokens do not fit the model's position table (``where``: which
    config, for the message), or None. Longer blocks fail in the embedding on the first batch
    (GPT-2) or run on positions the model never trained on."""
    limit = max_positions(config)
    if limit and seq_len > limit:
        return f"--seq_len {seq_len} is longer than the model's {limit} positions{where}: pass --seq_len <= {limit}"
    return None


def parse_overrides(text: str) -> Dict[str, Any]:
    """A ``--model_overrides`` argument: a JSON object; ``ValueError`` naming what is wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model_overrides is not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--model_overrides must be a JSON object, got {text!r}")
    return value


def known_keys(cls, also: Sequence[str] = ()) -> List[str]:
    """The keys a config class defines: its defaults', its aliases', its (and its bases')
    ``__init__`` keywords, and ``also`` (a loaded config file's own keys)."""
    keys = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {})) | set(also)
    for base in cls.__mro__:
        if "__init__" in vars(base):
            keys |= {n for n, p in inspect.signature(base.__init__).parameters.items()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    return sorted(keys)


def unknown_keys(cls, overrides: Dict[str, Any], known: Sequence[str]) -> List[str]:
    """The keys of ``overrides`` that config class ``cls`` neither defines (``known``: its
    ``known_keys``) nor consumes: a config keeps any other keyword as an attribute nothing reads
    (``rope_theta``, say, is consumed into ``rope_parameters`` and is no such key)."""
    known, out = set(known), []
    for key, value in overrides.items():
        if key in known:
            continue
        try:
            probe = cls(**{key: copy.deepcopy(value)})  # a config may rewrite a dict it is given
        except Exception:  # noqa: BLE001 - the class read it and refused the value: its own error comes later
            continue
        if key in vars(probe):
            out.append(key)
    return sorted(out)


def _refuse_unknown(cls, overrides: Dict[str, Any], also: Sequence[str] = ()) -> None:
    keys = known_keys(cls, also)
    unknown = unknown_keys(cls, overrides, keys)
    if unknown:  # a config takes any keyword and keeps it unused: a misspelt size would train the default
        near = {k: difflib.get_close_matches(k, keys, n=1) for k in unknown}
        raise ValueError("--model_overrides: a " + cls.model_type + " config has no " + ", ".join(
            repr(k) + (f" (did you mean {near[k][0]!r}?)" if near[k] else "") for k in unknown))


def _round_up(n: int, multiple: int = 8) -> int:
    return (n + multiple - 1) // multiple * multiple


def _tiny_gpt2(vocab_size: int, max_positions: int, **overrides: Any):
    from transformers import GPT2Config

    kw = dict(n_layer=4, n_embd=128, n_head=4, n_positions=max_positions,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kw.update(overrides)
    return GPT2Config(vocab_size=vocab_size, **kw)


def _tiny_llama(vocab_size: int, max_positions: int, **overrides: Any):
    from transformers import LlamaConfig

    kw = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=344, max_position_embeddings=max_positions, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(vocab_size=vocab_size, **kw)


BUILTIN_MODELS: Dict[str, Callable[..., Any]] = {
    "tiny-gpt2": _tiny_gpt2,
    "tiny-llama": _tiny_llama,
}


def has_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in _WEIGHT_FILES)


LAST_ID = -1  # build_config's default eos_token_id: the vocabulary's last id (the byte tokenizer's)


def _derived_head_dim(config, saved: bool = True) -> Optional[int]:
    """``hidden_size // num_attention_heads`` of a config with a ``head_dim`` (LLaMA-like); with
    ``saved``, only where the config's own ``head_dim`` is that (derived, not chosen); else None. A
    saved config.json writes the derived value out, so overriding the width would keep it."""
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if getattr(config, "head_dim", None) is None or not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1:
        return None
    if saved and config.head_dim != hidden // heads:
        return None
    return hidden // heads


def build_config(name_or_path: str, vocab_size: Optional[int] = None, max_positions: int = 256,
                 overrides: Optional[Dict[str, Any]] = None, eos_token_id: Optional[int] = LAST_ID):
    """The ``PretrainedConfig`` for a built-in name, a local directory or a transformers name.

    ``vocab_size`` (rounded up to a multiple of 8) sets the built-ins' vocabulary unless
    ``overrides`` name one; a config's vocabulary must not be smaller than it. ``overrides`` are
    set on the config. ``eos_token_id``: the tokenizer's end-of-document id (built-ins; by default
    the last id, 256 for bytes; None for a tokenizer without one: the config then has none, rather
    than an ordinary token that would end generation).
    """
    overrides = given = dict(overrides or {})
    if name_or_path in BUILTIN_MODELS:
        vocab = _round_up(vocab_size or 257)
        eos = (vocab_size or 257) - 1 if eos_token_id == LAST_ID else eos_token_id
        overrides = {"bos_token_id": eos, "eos_token_id": eos, **overrides}
        vocab = overrides.pop("vocab_size", vocab)
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
            raise ValueError(f"vocab_size override must be a positive integer, got {vocab!r}")
        ids = {k: overrides[k] for k in ("bos_token_id", "eos_token_id")}
        _refuse_unknown(type(BUILTIN_MODELS[name_or_path](vocab, max_positions, **ids)), overrides)
        try:
            config = BUILTIN_MODELS[name_or_path](vocab, max_positions, **overrides)
        except Exception as err:  # noqa: BLE001 - ValueError, or huggingface_hub's strict-dataclass error
            raise ValueError(f"--model_overrides: the {name_or_path} config refuses them: "
                             f"{' '.join(str(err).split())}") from None
    else:
        from transformers import AutoConfig

        from .data import refuse_near_miss

        if not os.path.exists(name_or_path):
            refuse_near_miss(name_or_path, list(BUILTIN_MODELS), "model")
        config = AutoConfig.from_pretrained(name_or_path)  # a hub name needs network access
        _refuse_unknown(type(config), overrides, also=list(config.to_dict()))
        layer_keys = {"num_hidden_layers", config.attribute_map.get("num_hidden_layers", "num_hidden_layers")}
        layers = getattr(config, "num_hidden_layers", None)  # GPT-2's n_layer too (attribute_map)
        per_layer = [k for k, v in config.to_dict().items()  # lists of one entry per block (layer_types)
                     if isinstance(v, list) and len(v) == layers and k not in overrides
                     and k != "architectures" and not k.endswith("token_id")]
        derived_head_dim = _derived_head_dim(config)
        for key, value in overrides.items():
            setattr(config, key, value)
        if derived_head_dim and "head_dim" not in overrides and {"hidden_size", "num_attention_heads"} & set(overrides):
            config.head_dim = _derived_head_dim(config, saved=False)  # as the class derives it, not the file's
        if overrides:  # setattr skips the class's checks (an exported model's per-block widths): rebuild it
            try:
                type(config).from_dict(config.to_dict())
            except Exception as err:  # noqa: BLE001 - ValueError, or huggingface_hub's strict-dataclass error
                hint = ""
                if layer_keys & set(overrides) and per_layer:
                    hint = f" (override {', '.join(per_layer)} too: one entry per block)"
                raise ValueError(f"--model_overrides {json.dumps(overrides)}: the {config.model_type} config "
                                 f"refuses them: {' '.join(str(err).split())}{hint}") from None
    problems = shape_problems(config)
    if problems:  # else a shape error inside the first forward, or a division by zero, naming no key
        raise ValueError(f"model {name_or_path!r}" + (f" with --model_overrides {json.dumps(given)}" if given else "")
                         + ": " + "; ".join(problems))
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} ids but model {name_or_path!r} only "
                         f"{config.vocab_size}")
    return config


def shape_problems(config) -> List[str]:
    """What makes a config's sizes unbuildable: a count that is not a positive integer, a width the
    heads do not divide (without an explicit ``head_dim``), query heads the key/value heads do not
    divide (names as the config spells them: GPT-2's ``n_embd``, LLaMA's ``hidden_size``)."""
    name = getattr(config, "attribute_map", {})  # LLaMA's name -> the config's own (GPT-2's n_embd)
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "max_position_embeddings", "intermediate_size", "n_inner", "head_dim")
    values = {k: getattr(config, k, None) for k in keys}
    problems = [f"{name.get(k, k)} = {v!r}: not a positive integer" for k, v in values.items()
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1)]
    if problems:
        return problems
    hidden, heads, kv = values["hidden_size"], values["num_attention_heads"], values["num_key_value_heads"]
    if hidden and heads and values["head_dim"] is None and hidden % heads:
        problems.append(f"{name.get('hidden_size', 'hidden_size')} = {hidden} is not a multiple of "
                        f"{name.get('num_attention_heads', 'num_attention_heads')} = {heads}")
    if heads and kv and heads % kv:
        problems.append(f"num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv}")
    return problems


def build_model(name_or_path: str, vocab_size: Optional[int] = None, max_positions: int = 256,
                seed: int = 0, overrides: Optional[Dict[str, Any]] = None,
                dtype: Optional[torch.dtype] = None, eos_token_id: Optional[int] = LAST_ID, resuming: bool = False):
    """A causal LM: ``from_pretrained`` for a local directory holding weights, else a seeded
    random init from :func:`build_config` (built-in names: ``tiny-gpt2``, ``tiny-llama``). Either
    way the config is checked against the tokenizer's ``vocab_size`` and gets the ``overrides``.
    ``resuming``: ``name_or_path`` may be a DeepSpeed checkpoint folder (its config.json; the
    weights come from the checkpoint)."""
    from transformers import AutoModelForCausalLM

    if (not resuming and os.path.isdir(name_or_path) and not has_weights(name_or_path)
            and os.path.isfile(os.path.join(name_or_path, "latest"))):  # would train from a random init
        raise ValueError(f"model {name_or_path!r} is a DeepSpeed checkpoint folder (it holds 'latest' and no model "
                         "weights): continue that run with --resume, or export it (python -m ds_bitter7.export) "
                         "and pass the export")
    config = build_config(name_or_path, vocab_size, max_positions, overrides, eos_token_id)
    if os.path.isdir(name_or_path) and has_weights(name_or_path):
        logger.info("loading weights from %s", name_or_path)
        return AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if os.path.isfile(os.path.join(name_or_path, "generation_config.json")):  # a folder's (a resumed run's) stop tokens
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(name_or_path)
    if dtype is not None:
        model = model.to(dtype)
    logger.info("random init %s (%s): %.2fM parameters", name_or_path, config.model_type,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


# config keys that set parameters and their shapes (GPT-2's names, the LLaMA family's, and the per-block
# widths of an exported bitter7_* model)
SHAPE_KEYS = ("model_type", "vocab_size", "n_layer", "n_embd", "n_head", "n_inner", "n_positions", "num_hidden_layers",
              "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings", "attention_bias", "mlp_bias", "tie_word_embeddings",
              "intermediate_sizes", "num_heads_per_layer", "num_kv_heads_per_layer")


def saved_model_config(folder: str) -> Dict[str, Any]:
    """The model config a run saved in ``folder`` (launch/train.py's ``--save_dir``, a Trainer's
    ``checkpoint-N``), with the defaults its config.json leaves out, or {} when it has none (never a
    hub name); ``ValueError`` naming a config.json that cannot be read (truncated, say): the check
    it serves would be skipped, and DeepSpeed's loading fail with a size-mismatch traceback."""
    from transformers import AutoConfig

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        return AutoConfig.from_pretrained(folder).to_dict()
    except Exception as err:  # noqa: BLE001 - an empty, truncated or foreign file
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:300]}): "
                         "copy it again from the training run") from None


def model_mismatch(saved: Dict[str, Any], config) -> Optional[str]:
    """How a saved model config (``saved_model_config``) differs from ``config`` in what sets the
    parameters, or None."""
    ours = config.to_dict()
    diffs = [f"{k}={saved[k]!r} where this run's has {ours.get(k)!r}" for k in SHAPE_KEYS
             if k in saved and saved[k] != ours.get(k)]
    if ("head_dim" in saved and saved["head_dim"] != ours.get("head_dim") and _derived_head_dim(config)
            and all(saved.get(k) == ours.get(k) for k in ("hidden_size", "num_attention_heads"))):
        # the only difference is the head_dim this run derived, where a local config.json's was kept before
        diffs.append(f"(a width override kept the local config.json's head_dim before ds_bitter7 derived it: add "
                     f"\"head_dim\": {saved['head_dim']} to --model_overrides)")
    return ", ".join(diffs) or None
