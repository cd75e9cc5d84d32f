"""Training and calibration data for causal language models.

Three sources, all through Hugging Face ``datasets``:

* ``"builtin"``: an offline English corpus built at run time from the docstrings of the Python
  standard library and the ``pydoc`` topic pages that ship with it. Deterministic for a given
  Python version (everything is sorted), cached under ``~/.cache/ds_bitter7/`` (atomic write).
* local ``.txt`` / ``.md`` / ``.json`` / ``.jsonl`` files (``load_dataset("text" | "json")``).
* a dataset name on the Hugging Face hub (``load_dataset(name)``; needs network access).

Text is tokenized (bytes by default, or a local ``transformers`` tokenizer), concatenated with an
end-of-document id and cut into fixed-length blocks of ``input_ids``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import sys
import sysconfig
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .comm import world_size_and_rank
from .state import atomic_write

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
CORPUS_FORMAT = 1  # bump when the corpus recipe changes, so old caches are not reused
VALIDATION_PERCENT = 5
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSON_SUFFIXES = (".json", ".jsonl")
# named files of these types are refused rather than read as text (a CSV's header would be a document)
NOT_TEXT_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar",
                     ".safetensors", ".bin", ".pt", ".pth", ".npy", ".npz", ".pkl", ".h5")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "lib2to3", "tests"}


# --------------------------------------------------------------------------- tokenizers
BYTES = "bytes"  # the tokenizer name of ByteTokenizer
BYTE_MODEL_VOCAB = 264  # the built-in models' vocabulary under the byte tokenizer: 257 ids, rounded up to 8


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus an end-of-document id 256 (vocabulary 257)."""

    eos_token_id = 256
    pad_token_id = 256
    vocab_size = 257

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no end-of-document id)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ids >= 256 (end of document) are dropped."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def get_tokenizer(path: Optional[str] = None):
    """A :class:`ByteTokenizer` (no ``path``, or ``"bytes"``), or ``AutoTokenizer.from_pretrained(path)``
    (a folder, or a hub name). ``ValueError`` for a local path that does not exist (the hub would
    be asked for it, and say only that the name is malformed or unreachable)."""
    if not path or path == BYTES:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1  # no hub name
    if local and not os.path.exists(path):
        raise ValueError(f"tokenizer {path!r}: no such folder")
    return AutoTokenizer.from_pretrained(path)


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of token ids the model's embedding must hold."""
    return len(tokenizer)


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # a saved HF tokenizer


def tokenizer_beside(folder: Optional[str]) -> Optional[str]:
    """``folder`` when it holds a saved tokenizer (a model folder, or a checkpoint folder that
    ``launch/train.py`` saved it in), else None."""
    if folder and os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_MARKERS):
        return folder
    return None


def tokenizer_change(trained_with: Any, ours: str) -> Tuple[Optional[str], Optional[str]]:
    """(why to refuse, what to warn about) resuming a run that recorded ``trained_with`` with the
    tokenizer ``ours``: bytes against a tokenizer folder feeds ids that mean other text (the
    vocabulary sizes can agree); two folders may hold the same tokenizer (a moved copy)."""
    if not isinstance(trained_with, str) or trained_with == ours:
        return None, None
    said = f"the run was trained with the tokenizer {trained_with!r}, this one has {ours!r}"
    if (trained_with == BYTES) != (ours == BYTES):
        return f"{said}: its ids would mean other text; pass --tokenizer {trained_with}", None
    if os.path.realpath(trained_with) != os.path.realpath(ours):
        return None, f"{said}: make sure they are the same tokenizer"
    return None, None


def _encode_batch(tokenizer, texts: List[str]) -> List[List[int]]:
    if isinstance(tokenizer, ByteTokenizer):
        return [tokenizer.encode(t) for t in texts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def eos_id(tokenizer) -> Optional[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if eos is not None else getattr(tokenizer, "sep_token_id", None)


# --------------------------------------------------------------------------- built-in corpus
def _docstrings(path: str) -> List[str]:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
    return [d for d in docs if d and len(d) > 20]


def _stdlib_documents() -> List[Dict[str, str]]:
    """One document per stdlib source file and one per pydoc topic, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn.startswith("test"):
                continue
            path = os.path.join(dirpath, fn)
            texts = _docstrings(path)
            if texts:
                name = os.path.relpath(path, root).replace(os.sep, "/")
                docs.append({"name": f"stdlib/{name}", "text": "\n\n".join(texts)})
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    docs += [{"name": f"pydoc/{k}", "text": topics[k].strip()} for k in sorted(topics)]
    docs.sort(key=lambda d: d["name"])
    return docs


def cache_dir() -> str:
    """``$DS_BITTER7_CACHE`` or ``~/.cache/ds_bitter7``."""
    return os.environ.get("DS_BITTER7_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ds_bitter7")


def corpus_cache_path(directory: Optional[str] = None) -> str:
    """Cache file of the built-in corpus for this Python version."""
    v = sys.version_info
    name = f"stdlib_corpus_v{CORPUS_FORMAT}_py{v.major}.{v.minor}.{v.micro}.jsonl"
    return os.path.join(directory or cache_dir(), name)


def _atomic_write_jsonl(path: str, rows: List[Dict[str, str]]) -> None:
    """``rows`` as JSON lines, atomically: concurrent ranks see the old file or the full new one."""
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def builtin_documents(directory: Optional[str] = None) -> List[Dict[str, str]]:
    """The built-in corpus: ``[{"name", "text"}]`` sorted by name, built once and cached."""
    path = corpus_cache_path(directory)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                docs = [json.loads(line) for line in f if line.strip()]
            if docs and all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in docs):
                return docs
        except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            pass
        logger.warning("built-in corpus cache %s is damaged (truncated or edited?): building it again", path)
    docs = _stdlib_documents()
    logger.info("built-in corpus: %d documents, %.1f MB -> %s", len(docs),
                sum(len(d["text"]) for d in docs) / 1e6, path)
    _atomic_write_jsonl(path, docs)
    return docs


def split_of(name: str, validation_percent: int = VALIDATION_PERCENT) -> str:
    """``"validation"`` or ``"train"`` for a document, from a hash of its name (stable everywhere)."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
    return "validation" if bucket < validation_percent else "train"


def builtin_dataset(split: str = "train", directory: Optional[str] = None):
    """The built-in corpus split as a ``datasets.Dataset`` with columns ``name`` and ``text``."""
    import datasets

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    rows = [d for d in builtin_documents(directory) if split_of(d["name"]) == split]
    return datasets.Dataset.from_list(rows)


# --------------------------------------------------------------------------- text datasets
def _text_column(ds) -> str:
    """``text``, else (hub datasets only) the one string column, named in a warning."""
    if "text" in ds.column_names:
        return "text"
    strings = [name for name, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    if len(strings) != 1:
        raise ValueError(f"no 'text' column in dataset with columns {ds.column_names} (and not exactly one "
                         "string column to use instead)")
    logger.warning("dataset has no 'text' column; using its only string column %r", strings[0])
    return strings[0]


def _text_documents(path: str) -> List[str]:
    """The documents of a text file: separated by blank (or whitespace-only) lines, newlines kept
    inside; a file with no blank line at all is one document per line."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not text
            text = f.read().replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    docs = [d.strip("\n") for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
    if len(docs) == 1 and "\n" in docs[0]:
        logger.info("%s has no blank line: one document per line", path)
        docs = [line for line in docs[0].split("\n") if line.strip()]
    return docs


def read_local_files(files: Sequence[str]):
    """A ``datasets.Dataset`` of documents from local files, each row with a ``text`` field.

    JSON / JSON lines: one document per record, from its ``"text"`` field (required). Text files
    (.txt/.md/...): ``_text_documents``. Empty documents are dropped. Raises ``ValueError`` naming
    the files at fault.
    """
    import datasets

    files = list(files)
    if not files:
        raise ValueError("no .txt/.md/.json/.jsonl files given")
    unsupported = [f for f in files if f.lower().endswith(NOT_TEXT_SUFFIXES)]
    if unsupported:
        raise ValueError(f"unsupported data file type: {unsupported} (supported: "
                         f"{'/'.join(TEXT_SUFFIXES + JSON_SUFFIXES)}, or plain text under another name)")
    other = [f for f in files if not f.lower().endswith(TEXT_SUFFIXES + JSON_SUFFIXES)]
    if other:  # a named file (a folder gives only those types): WikiText's wiki.train.raw, a bare name
        logger.warning("data: reading %s as plain text", other)
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise ValueError(f"empty data file(s): {empty}")
    kinds = {"json" if f.lower().endswith(JSON_SUFFIXES) else "text" for f in files}
    if len(kinds) > 1:
        raise ValueError(f"mix of text and JSON files is not supported: {files}")
    kind = kinds.pop()
    if kind == "text":
        ds = datasets.Dataset.from_dict({"text": [d for f in files for d in _text_documents(f)]})
    else:
        try:
            ds = datasets.load_dataset("json", data_files=files, split="train")
        except Exception as err:  # malformed JSON: datasets names neither the file nor the line
            where = _first_json_error(files)
            raise ValueError(f"cannot read {files} as JSON: " + (where or f"{type(err).__name__}: {err}")) from err
    if "text" not in ds.column_names:
        raise ValueError(f"{files}: every JSON record needs a 'text' field; the records have {ds.column_names}")
    if kind == "json" and getattr(ds.features["text"], "dtype", None) not in ("string", "large_string"):
        bad = next(((i, t) for i, t in enumerate(ds["text"]) if t is not None and not isinstance(t, str)), None)
        what = (f"record {bad[0]} (counting from 0 over the files) holds {bad[1]!r}" if bad
                else "in every record it is null or missing")
        raise ValueError(f"{files}: the 'text' field of every JSON record must be a string; {what}")
    try:  # the JSON reader takes any bytes; they are decoded here
        missing, records = (ds["text"].count(None) if kind == "json" else 0), len(ds)
        ds = ds.filter(lambda row: isinstance(row["text"], str) and bool(row["text"].strip()))
    except UnicodeDecodeError as err:
        raise ValueError(f"{[f for f in files if not _is_utf8(f)] or files}: not UTF-8 text ({err})") from None
    if missing:
        logger.warning("%s: %d of %d JSON records have no 'text' (missing or null): skipped", files, missing, records)
    if len(ds) == 0:
        raise ValueError(f"no text in {files} (only whitespace)")
    return ds


def _first_json_error(files: Sequence[str]) -> Optional[str]:
    """Where the first of ``files`` that is not valid JSON (a .json document) or JSON lines (one
    record per line) fails, as ``file:line: error``; None when each parses."""
    import json

    def parses(text: str) -> Optional[json.JSONDecodeError]:
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return err
        return None

    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            return f"{path}: {type(err).__name__}: {err}"
        records = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        whole = parses("\n".join(lines)) if path.lower().endswith(".json") else None
        if path.lower().endswith(".json") and (whole is None or not records or parses(records[0][1])):
            if whole is not None:  # one JSON document (a .json file of JSON lines falls through)
                return f"{path}:{whole.lineno}: {whole.msg} (column {whole.colno})"
            continue
        for number, line in records:
            err = parses(line)
            if err is not None:
                return f"{path}:{number}: {err.msg} (column {err.colno})"
    return None


def _is_utf8(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            while f.read(1 << 20):
                pass
    except UnicodeDecodeError:
        return False
    return True


def _split_train(ds, validation_fraction: float, seed: int) -> Tuple[Any, Any]:
    if len(ds) < 2:
        raise ValueError(f"need at least 2 rows to split off a validation set, got {len(ds)}")
    parts = ds.train_test_split(test_size=validation_fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def refuse_near_miss(name: str, builtins: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` when ``name`` (no local path) is a typo of a built-in name, before it
    goes to the Hugging Face hub (which, offline, retries for half a minute and says only that
    it cannot connect)."""
    import difflib

    close = difflib.get_close_matches(name, builtins, n=1, cutoff=0.75)
    if close and name not in builtins:
        raise ValueError(f"{what} {name!r} is no local path and no built-in name: did you mean {close[0]!r}? "
                         f"(other names are fetched from the Hugging Face hub; built-in: {', '.join(builtins)})")


def _folder_files(folder: str) -> List[str]:
    """The data files directly in ``folder`` (suffixes in any case), without hidden ones (``.*``:
    macOS's ``._name`` copies are binary). Raises ``ValueError`` when there are none: a folder of
    folders is not searched, and ``read_local_files`` would not know which folder was empty."""
    names = sorted(os.listdir(folder))
    found = [os.path.join(folder, f) for f in names
             if not f.startswith(".") and f.lower().endswith(TEXT_SUFFIXES + JSON_SUFFIXES)
             and os.path.isfile(os.path.join(folder, f))]
    if not found:
        subfolders = [f for f in names if os.path.isdir(os.path.join(folder, f)) and not f.startswith(".")]
        raise ValueError(f"no {'/'.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files in the folder {folder!r}"
                         + (f" (its subfolders {subfolders[:5]} are not searched: name them)" if subfolders else ""))
    return found


def local_files(spec: Sequence[str]) -> Optional[List[str]]:
    """The data files of ``spec`` (files, and the data files in folders: ``_folder_files``), or
    None if a path is missing.

    A folder holding JSON files gives those only (a README.md beside JSON lines data is not data).
    """
    files = []
    for item in spec:
        if os.path.isdir(item):
            found = _folder_files(item)
            json_files = [f for f in found if f.lower().endswith(JSON_SUFFIXES)]
            if json_files and len(json_files) < len(found):  # said: a text file put there as data is left out
                skipped = [os.path.basename(f) for f in found if f not in json_files]
                logger.warning("data: %s: reading its JSON files only (%d), not its text files %s", item,
                               len(json_files), skipped[:5] + (["..."] if len(skipped) > 5 else []))
            files += json_files or found
        elif os.path.exists(item):
            files.append(item)
        else:
            return None
    unique = list(dict.fromkeys(os.path.realpath(f) for f in files))  # a file named twice would leak into both splits
    if len(unique) < len(files):
        logger.warning("data: %d file(s) named more than once (a folder and a file in it?); each is read once",
                       len(files) - len(unique))
    return unique


def load_text_datasets(data: Union[str, Sequence[str]], validation_fraction: float = 0.05,
                       seed: int = 0, hub_config: Optional[str] = None) -> Tuple[Any, Any]:
    """(train, validation) ``datasets.Dataset`` objects with a text column.

    ``data`` is ``"builtin"``, local file(s)/directories (``read_local_files``: text files with
    documents separated by blank lines, or JSON lines with a ``text`` field; split by document,
    deterministically with ``seed``), or a hub dataset name (its ``validation`` split when it has one)
    with its configuration ``hub_config`` (``wikitext`` needs one, e.g. ``wikitext-103-raw-v1``).
    """
    import datasets

    spec = [data] if isinstance(data, str) else list(data)
    files = None if spec == [BUILTIN] else local_files(spec)
    if hub_config is not None and (spec == [BUILTIN] or files is not None):
        raise ValueError(f"a dataset configuration ({hub_config!r}) is for a hub dataset name, not for {spec}")
    if spec == [BUILTIN]:
        return builtin_dataset("train"), builtin_dataset("validation")
    if files is not None:
        if not files:
            raise ValueError(f"no .txt/.md/.json/.jsonl files in {spec}")
        ds = read_local_files(files)
        if len(ds) < 2:
            raise ValueError(f"{files} hold one document: a validation split needs at least 2 (separate "
                             "documents in text files with blank lines, or use JSON lines)")
        return _split_train(ds, validation_fraction, seed)
    if len(spec) != 1:
        raise ValueError(f"data paths do not exist: {[s for s in spec if not os.path.exists(s)]}")
    refuse_near_miss(spec[0], [BUILTIN], "data")
    if spec[0].endswith(TEXT_SUFFIXES + JSON_SUFFIXES) or spec[0].startswith((".", os.sep)):
        raise ValueError(f"data path {spec[0]!r} does not exist (not sent to the hub: it names a file)")
    dd = datasets.load_dataset(spec[0], hub_config)  # hub name: needs network access
    if "validation" in dd:
        return dd["train"], dd["validation"]
    return _split_train(dd["train"], validation_fraction, seed)


def chunk_dataset(ds, tokenizer, seq_len: int, what: str = "dataset"):
    """Tokenize, join documents with the end-of-document id and cut into ``seq_len`` blocks.

    Returns a ``datasets.Dataset`` with one column ``input_ids`` (torch format). Each map batch of
    documents gives its whole blocks; the tokens left over at each batch's end are joined (in
    order) into blocks of their own, so at most one partial block of the whole text is dropped.
    ``what`` names the data in the error when no block results.
    """
    import datasets

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a next-token target), got {seq_len}")
    column = _text_column(ds)
    eos = eos_id(tokenizer)
    if eos is None:
        logger.warning("the tokenizer has no end-of-text (or separator) token: %s's documents are joined with "
                       "nothing between them", what)

    def to_blocks(batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        flat: List[int] = []
        for ids in _encode_batch(tokenizer, [t for t in batch[column] if t]):
            flat.extend(ids)
            if eos is not None:
                flat.append(eos)
        n = len(flat) // seq_len
        rows = [flat[i * seq_len:(i + 1) * seq_len] for i in range(n)] + [flat[n * seq_len:]]
        return {"input_ids": rows, "whole": [True] * n + [False]}  # the last row: this batch's leftover

    pieces = ds.map(to_blocks, batched=True, batch_size=1000, remove_columns=ds.column_names,
                    desc=f"blocks of {seq_len}")
    flags = pieces["whole"]
    whole = pieces.select([i for i, w in enumerate(flags) if w])
    left = [t for ids in pieces.select([i for i, w in enumerate(flags) if not w])["input_ids"] for t in ids]
    extra = [left[i * seq_len:(i + 1) * seq_len] for i in range(len(left) // seq_len)]
    blocks = datasets.concatenate_datasets(
        [whole, datasets.Dataset.from_dict({"input_ids": extra, "whole": [True] * len(extra)}, features=whole.features)])
    blocks = blocks.remove_columns("whole")
    if len(blocks) == 0:
        raise ValueError(f"{what} too small for one block of {seq_len} tokens ({len(left)} tokens)")
    blocks.set_format("torch", columns=["input_ids"])
    return blocks


def build_lm_datasets(data: Union[str, Sequence[str]], tokenizer, seq_len: int,
                      validation_fraction: float = 0.05, seed: int = 0,
                      hub_config: Optional[str] = None) -> Tuple[Any, Any]:
    """(train, validation) block datasets of ``input_ids`` of length ``seq_len``."""
    train, val = load_text_datasets(data, validation_fraction, seed, hub_config)
    return (chunk_dataset(train, tokenizer, seq_len, what="the train split"),
            chunk_dataset(val, tokenizer, seq_len, what="the validation split"))


# --------------------------------------------------------------------------- loaders
def collate_blocks(rows: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack block rows into ``{"input_ids": LongTensor[b, T]}``."""
    return {"input_ids": torch.stack([torch.as_tensor(r["input_ids"]) for r in rows]).long()}


def make_dataloader(blocks, batch_size: int, shuffle: bool = True, seed: int = 0,
                    world_size: Optional[int] = None, rank: Optional[int] = None,
                    drop_last: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's share (``DistributedSampler``, seeded) of ``blocks``.

    Call ``loader.sampler.set_epoch(e)`` each epoch for a new deterministic order.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if world_size is None or rank is None:
        world_size, rank = world_size_and_rank()
    sampler = DistributedSampler(blocks, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last and len(blocks) >= world_size)
    return DataLoader(blocks, batch_size=batch_size, sampler=sampler, collate_fn=collate_blocks,
                      drop_last=drop_last and len(blocks) >= world_size * batch_size)


def eval_dataloader(blocks, batch_size: int, world_size: Optional[int] = None,
                    rank: Optional[int] = None) -> torch.utils.data.DataLoader:
    """Validation batches of this rank's blocks ``rank, rank + world, ...``, in order: every block
    counted once over all ranks (a ``DistributedSampler`` pads the shares by repeating blocks, so
    the perplexity moved with the world size) and none dropped."""
    if world_size is None or rank is None:
        world_size, rank = world_size_and_rank()
    return torch.utils.data.DataLoader(torch.utils.data.Subset(blocks, range(rank, len(blocks), world_size)),
                                       batch_size=batch_size, collate_fn=collate_blocks)


def calibration_batches(train_blocks, batch_size: int, num_batches: int, seed: int = 1234,
                        rank_aware: bool = True) -> List[Dict[str, torch.Tensor]]:
    """``num_batches`` batches ``{"input_ids": LongTensor[b, T]}`` drawn from the TRAIN blocks.

    A list, so it can be iterated at every pruning event. With ``rank_aware`` each rank gets
    different blocks (the statistics are all-reduced); otherwise all ranks get the same ones.
    """
    world_size, rank = world_size_and_rank() if rank_aware else (1, 0)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_blocks), generator=g).tolist()
    mine = order[rank::world_size]
    need = batch_size * num_batches
    if len(train_blocks) < world_size:  # the same decision on every rank
        raise ValueError(f"{len(train_blocks)} block(s) of text for calibration on {world_size} rank(s): "
                         "every rank needs at least one (more text, or a shorter sequence length)")
    if len(mine) < need:
        logger.warning("calibration: %d distinct block(s) per rank for %d rows: blocks are repeated",
                       len(mine), need)
    picks = [mine[i % len(mine)] for i in range(need)]
    return [collate_blocks([train_blocks[j] for j in picks[i:i + batch_size]])
            for i in range(0, need, batch_size)]


def iterate_forever(loader: torch.utils.data.DataLoader, start_batch: int = 0
                    ) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless batches, re-seeding the sampler each epoch; skips the first ``start_batch``."""
    n = len(loader)
    if n == 0:
        raise ValueError("data loader is empty: fewer blocks than ranks x batch size")
    epoch, skip = divmod(start_batch, n)
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        skip = 0
        epoch += 1
