"""Helpers for tests that start multi-rank training runs in subprocesses (CPU, gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

from ds_bitter7.comm import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MPIRUN = shutil.which("mpirun", path=str(VENV_BIN)) or shutil.which("mpirun")


def mpirun(n: int) -> List[str]:
    """mpirun with ``n`` ranks here (root, oversubscribed), forwarding the environment of ``env``."""
    return [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(n),
            "-x", "DS_ACCELERATOR", "-x", "GLOO_SOCKET_IFNAME", "-x", "MASTER_PORT", "-x", "PYTHONPATH",
            "-x", "DS_BITTER7_CACHE", "-x", "HF_DATASETS_CACHE", "-x", "PATH"]


TINY_MODEL = ["--model", "tiny-gpt2", "--model_overrides", json.dumps({"n_layer": 2, "n_embd": 32})]


def env(tmp_path: Path) -> Dict[str, str]:
    out = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", DS_BITTER7_CACHE=str(tmp_path / "cache"),
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO),
               OMPI_MCA_btl_sm_backing_directory=str(tmp_path))  # an aborted mpirun job leaves 16 MiB there, not in /dev/shm
    out["PATH"] = f"{VENV_BIN}{os.pathsep}{out.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):  # a one-rank group
        out.pop(key, None)  # started in this process would pass its own to the launched ranks
    return out


def write_corpus(path: Path, n_docs: int = 40) -> Path:
    """A small English JSON-lines corpus from the pydoc topics that ship with Python."""
    from pydoc_data.topics import topics

    with open(path, "w", encoding="utf-8") as f:
        for key in sorted(topics)[:n_docs]:
            f.write(json.dumps({"text": topics[key]}) + "\n")
    return path


def write_word_tokenizer(folder: Path, n_words: int = 300) -> Path:
    """A word-level tokenizer of ``n_words`` ids (``w0`` .. ; every other word is ``w0``), saved
    with ``save_pretrained``: a tokenizer that is not the byte one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1").save_pretrained(str(folder))
    return folder


def tiny_ds_config(path: Path, bias_compensation: bool = False, structures=("mlp_neuron",)) -> Path:
    cfg = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "bitter7": {"enabled": True, "structures": list(structures), "target_sparsity": 0.5,
                    "schedule": {"start_step": 2, "end_step": 6, "frequency": 2},
                    "bias_compensation": {"enabled": bias_compensation, "source": "calibration",
                                          "num_batches": 2}},
    }
    path.write_text(json.dumps(cfg))
    return path


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries ``tag``: a launcher's ranks can sit in
    sessions of their own (torch elastic), out of reach of its process group, and hold its pipe."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            if tag.encode() in (proc_dir / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except OSError:  # ended meanwhile (ProcessLookupError), or not ours to read
            continue


def run(cmd: List[str], tmp_path: Path, timeout: int = 120, fails: bool = False) -> str:
    """Run a launcher and return its output; on timeout kill every process it started (the ranks
    too), then fail. Asserts it exits 0, or, with ``fails``, that it does not."""
    run_id = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env(tmp_path), DS_BITTER7_TEST_RUN=run_id),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_tagged(f"DS_BITTER7_TEST_RUN={run_id}")
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = "(its output could not be read: a process it started still holds the pipe)"
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-6000:]}") from None
    if fails:
        assert proc.returncode != 0, f"{' '.join(cmd)} succeeded, expected to fail:\n{out[-6000:]}"
    else:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def load_without_ds_bitter7(folder: Path, tmp_path: Path, expected_logits: Path) -> Tuple[str, float]:
    """Load ``folder`` with ``trust_remote_code=True`` in a process that never imports ds_bitter7:
    (the model's class name, the largest logit difference against ``expected_logits``, relative),
    on ids ``[2, 11]`` drawn from its vocabulary with seed 2."""
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert not any(m.startswith("ds_bitter7") for m in sys.modules), "ds_bitter7 was imported"
        ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            got = model(input_ids=ids).logits
        want = torch.load({str(expected_logits)!r})
        print(type(model).__name__, float((got - want).abs().max() / want.abs().max()))
    """)
    clean = {k: v for k, v in env(tmp_path).items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], env=dict(clean, HF_MODULES_CACHE=str(tmp_path / "modules")),
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    cls, rel = done.stdout.split()[-2:]
    return cls, float(rel)
