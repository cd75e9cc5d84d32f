"""launch/train.py and ``python -m ds_bitter7.oneshot`` under torchrun, the deepspeed launcher and
mpirun: 2 CPU ranks, a few steps."""

from __future__ import annotations

import glob
import json
import os
import shutil
import time

import pytest
from _launch_util import (
    MPIRUN,
    REPO,
    TINY_MODEL,
    VENV_BIN,
    env,
    free_port,
    mpirun,
    run,
    tiny_ds_config,
    write_corpus,
    write_word_tokenizer,
)
from transformers import AutoTokenizer, GenerationConfig

from ds_bitter7 import data as dsdata
from ds_bitter7 import modeling
from ds_bitter7.comm import stale_build_locks

STEPS = 8


def train_args(tmp_path, summary, extra=()):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    config = tiny_ds_config(tmp_path / "ds.json", bias_compensation=True)
    return ["launch/train.py", "--config", str(config), "--data", str(corpus), *TINY_MODEL,
            "--seq_len", "32", "--steps", str(STEPS), "--eval_every", "4", "--eval_batches", "2",
            "--calibration_batches", "2", "--summary", str(summary), *extra]


def check_summary(path, steps=STEPS):
    summary = json.loads(path.read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == steps
    assert summary["pruning"] and summary["sparsity"]["mlp_neuron"] == pytest.approx(0.5)
    assert summary["ppl_final"] < summary["ppl_start"]
    return summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of launch/train.py under torchrun (2 ranks, pruned 50% during training)."""
    root = tmp_path_factory.mktemp("trained")
    summary, ckpt = root / "summary.json", root / "ckpt"
    run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         *train_args(root, summary, ["--save_dir", str(ckpt)])], root)
    return root, summary, ckpt


def test_a_build_lock_left_by_a_killed_build_is_named(tmp_path, monkeypatch):
    """init_distributed warns about it: DeepSpeed's start would otherwise wait on it silently."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for op in ("deepspeed_shm_comm", "cpu_adam"):
        (tmp_path / op).mkdir()
        (tmp_path / op / "lock").touch()
    hour_ago = time.time() - 3600
    os.utime(tmp_path / "deepspeed_shm_comm" / "lock", (hour_ago, hour_ago))
    old_lock = str(tmp_path / "deepspeed_shm_comm" / "lock")
    stale = stale_build_locks()
    assert list(stale) == [old_lock]  # a fresh one may be a build
    assert 3590 < stale[old_lock] < 3700
    assert list(stale_build_locks(max_age_s=-1)) == [str(tmp_path / op / "lock") for op in ("cpu_adam",
                                                                                           "deepspeed_shm_comm")]


def test_srun_tasks_without_a_launcher_are_refused(monkeypatch):
    """srun without PMI starts N processes that know no rank: each would train alone (a world of one)."""
    from ds_bitter7.comm import init_distributed

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(RuntimeError, match="srun started 4 tasks, but neither torchrun's variables"):
        init_distributed()


def test_rank_variables_of_a_per_node_launcher_under_mpi_are_kept(monkeypatch):
    """``srun --mpi=pmix torchrun`` or ``mpirun -ppn 1 torchrun``: MPI numbers the nodes, torchrun
    the processes, and torchrun's RANK is the one to use; without a per-node launcher a RANK that
    disagrees with MPI's is stale (test_oneshot_under_mpirun runs that case)."""
    from ds_bitter7.comm import PER_NODE_LAUNCHERS, drop_stale_rank_env, launch_rank

    for var in PER_NODE_LAUNCHERS + ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert launch_rank() == 5
    drop_stale_rank_env()
    assert {k: os.environ.get(k) for k in env} == env
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert launch_rank() == 1  # read before the stale RANK is dropped (one-shot's rank 1 printed rank 0's lines)
    drop_stale_rank_env()
    assert [os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")] == [None, None, None]


def test_torchrun_with_checkpoint_and_resume(trained, tmp_path):
    _, first_summary, original = trained
    first = check_summary(first_summary)
    assert (original / "latest").read_text().strip() == f"global_step{STEPS}"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(original, ckpt)  # the other tests read the original
    summary = tmp_path / "summary.json"
    run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         *train_args(tmp_path, summary, ["--save_dir", str(ckpt), "--resume", "--steps", str(STEPS + 2)])],
        tmp_path)
    resumed = json.loads(summary.read_text())
    assert resumed["start_step"] == STEPS and resumed["steps"] == STEPS + 2
    assert resumed["ppl_start"] == pytest.approx(first["ppl_start"])
    assert [r["units_kept"] for r in resumed["layers"]] == [r["units_kept"] for r in first["layers"]]
    # resumed again with no step to take and no --save_dir: both said, and the final perplexity is
    # the resumed model's own, not the step-0 one from the checkpoint; no --model: the checkpoint's
    # (its config.json), not the default tiny-gpt2 refused as another model
    again = tmp_path / "again.json"
    no_model = [a for a in train_args(tmp_path, again, ["--resume", str(ckpt), "--steps", str(STEPS + 2)])
                if a not in TINY_MODEL]
    out = run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *no_model],
              tmp_path)
    assert "is not past the checkpoint's step" in out and "no --save_dir: this resumed run's checkpoints" in out
    again = json.loads(again.read_text())
    assert again["start_step"] == again["steps"] == STEPS + 2
    assert again["ppl_final"] == pytest.approx(resumed["ppl_final"]) and again["ppl_final"] != again["ppl_start"]
    assert again["train_loss_final"] is None  # no step taken: null (a NaN made the file invalid JSON)
    with pytest.raises(ValueError, match="is a DeepSpeed checkpoint folder .* continue that run with --resume"):
        modeling.build_model(str(ckpt), 257)  # as --model: it trained from a random init without a word


def test_train_warns_and_refuses_in_one_process(tmp_path):
    """A bad bitter7 key is refused before data and model are built, a bad model key before the
    data; a run shorter than the schedule says where it stops; the tokenizer goes beside the
    checkpoint and into an export; a second run into the same --save_dir is refused; resuming a
    pruned checkpoint with no bitter7 section says the masks are dropped (one process: plain
    python, no launcher)."""
    python = str(VENV_BIN / "python")
    corpus, config = write_corpus(tmp_path / "corpus.jsonl"), tiny_ds_config(tmp_path / "ds.json")
    cfg = json.loads(config.read_text())
    tokenizer = write_word_tokenizer(tmp_path / "tokenizer", 500)
    base = [python, "launch/train.py", "--data", str(corpus), *TINY_MODEL, "--seq_len", "32",
            "--eval_every", "0", "--eval_batches", "1", "--calibration_batches", "0", "--tokenizer", str(tokenizer)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(cfg, bitter7=dict(cfg["bitter7"], targt_sparsity=0.5))))
    out = run(base + ["--config", str(bad), "--steps", "4"], tmp_path, fails=True)
    assert "bitter7.targt_sparsity = 0.5: unknown key" in out and "data:" not in out
    out = run(base + ["--config", str(config), "--steps", "4", "--model_overrides", '{"n_embed": 64}'], tmp_path,
              fails=True)  # the model is built before the data, whose tokenization can take long
    assert "a gpt2 config has no 'n_embed' (did you mean 'n_embd'?)" in out and "data:" not in out
    # a DeepSpeed setting the pruner cannot serve: before the model; an optimizer with no Adam state:
    # said after the first step, without a traceback
    zero = dict(cfg["zero_optimization"], round_robin_gradients=True)
    bad.write_text(json.dumps(dict(cfg, zero_optimization=zero)))
    out = run(base + ["--config", str(bad), "--steps", "4"], tmp_path, fails=True)
    assert "round_robin_gradients = true: DeepSpeed's fp32 master mapping" in out and "random init" not in out
    # "auto" is the HF Trainer's to fill in: this script read it as a number after building the data
    bad.write_text(json.dumps(dict(cfg, train_micro_batch_size_per_gpu="auto", gradient_clipping="auto")))
    out = run(base + ["--config", str(bad), "--steps", "4"], tmp_path, fails=True)
    assert 'train_micro_batch_size_per_gpu, gradient_clipping = "auto": only the HF Trainer' in out, out
    assert "random init" not in out
    bad.write_text(json.dumps(dict(cfg, optimizer={"type": "SGD", "params": {"lr": 1e-2}},
                                   zero_allow_untested_optimizer=True)))
    out = run(base + ["--config", str(bad), "--steps", "4"], tmp_path, fails=True)
    assert "optimizer state 'exp_avg_sq' does not exist" in out and "Traceback" not in out
    ckpt = tmp_path / "ckpt"
    out = run(base + ["--config", str(config), "--steps", "4", "--save_dir", str(ckpt)], tmp_path)
    assert "--steps 4 ends before schedule.end_step 6: the run stops at sparsity 0.0625 of target_sparsity 0.5" in out
    # the tokenizer is saved beside config.json, where export and one-shot look for it
    assert len(AutoTokenizer.from_pretrained(str(ckpt))) == 500
    run([python, "-m", "ds_bitter7.export", str(ckpt), str(tmp_path / "small")], tmp_path)
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "small"))) == 500
    out = run(base + ["--config", str(config), "--steps", "4", "--save_dir", str(ckpt)], tmp_path, fails=True)
    assert f"--save_dir '{ckpt}' already holds checkpoints (latest: global_step4): continue that run with --resume" in out
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps({k: v for k, v in cfg.items() if k != "bitter7"}))
    # no --tokenizer: the one saved beside the checkpoints, not bytes; other --data is warned about
    other = write_corpus(tmp_path / "other.jsonl", n_docs=30)
    no_tok = base[:base.index("--tokenizer")] + ["--data", str(other)]
    out = run(no_tok + ["--config", str(dense), "--steps", "5", "--resume", str(ckpt)], tmp_path)
    assert "carries ds_bitter7 pruner state but this run's config has no bitter7 section" in out
    assert f"the checkpoint's run trained with --data {corpus}; this one has --data {other}" in out
    assert "tokenizer" not in out.split("resumed from")[-1]  # neither refused nor warned: it is the run's own
    # a --model folder with weights: its own tokenizer files, else (more ids than bytes) a refusal
    model_dir = tmp_path / "word_model"
    word_model = modeling.build_model("tiny-gpt2", 500, overrides={"n_layer": 1, "n_embd": 32})
    word_model.generation_config.eos_token_id = [499, 7]  # a chat model's stop tokens: beside the checkpoints
    word_model.save_pretrained(model_dir)
    out = run(no_tok + ["--config", str(dense), "--steps", "1", "--model", str(model_dir)], tmp_path, fails=True)
    assert "has trained weights for 504 token ids and no tokenizer files beside them" in out
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(model_dir)
    run(no_tok + ["--config", str(dense), "--steps", "1", "--model", str(model_dir), "--save_dir",
                  str(tmp_path / "word_ckpt")], tmp_path)
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "word_ckpt"))) == 500
    # resumed without --model: the checkpoint's model, and its generation config (it was overwritten by
    # the default one of a model built from config.json alone)
    no_model = [a for a in no_tok if a not in TINY_MODEL]
    run(no_model + ["--config", str(dense), "--steps", "2", "--resume", str(tmp_path / "word_ckpt"), "--save_dir",
                    str(tmp_path / "word_ckpt")], tmp_path)
    assert GenerationConfig.from_pretrained(str(tmp_path / "word_ckpt")).eos_token_id == [499, 7]
    run([python, "-m", "ds_bitter7.oneshot", str(tmp_path / "word_ckpt"), str(tmp_path / "word_small"),
         "--sparsity", "0.25", "--compensation", "none"], tmp_path)
    assert GenerationConfig.from_pretrained(str(tmp_path / "word_small")).eos_token_id == [499, 7]


def test_deepspeed_launcher(tmp_path):
    summary = tmp_path / "summary.json"
    port = free_port()
    run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
         *train_args(tmp_path, summary)], tmp_path)
    check_summary(summary)
    # DeepSpeed's CPU all-reduce buffers (69 MB a rank, made because the launcher sets LOCAL_SIZE)
    # are unlinked, not left in /dev/shm after the run
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def test_deepspeed_launcher_one_rank_leaves_no_shared_memory(tmp_path):
    """One rank is one node too: DeepSpeed's buffer is made and must be unlinked as well."""
    script = tmp_path / "one_rank.py"
    script.write_text("import torch, deepspeed.comm\nfrom ds_bitter7.comm import init_distributed\n"
                      "assert init_distributed() == (1, 0)\nt = torch.ones(3)\ndeepspeed.comm.all_reduce(t)\n"
                      "assert t.tolist() == [1.0, 1.0, 1.0]\n")
    port = free_port()
    run([str(VENV_BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(port), str(script)], tmp_path)
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="no mpirun")


@needs_mpirun
def test_mpirun(tmp_path):
    summary = tmp_path / "summary.json"
    run([*mpirun(2), str(VENV_BIN / "python"), *train_args(tmp_path, summary)], tmp_path)
    check_summary(summary)


def oneshot_args(trained, tmp_path):
    root, _, ckpt = trained
    corpus = str(root / "corpus.jsonl")
    return ["-m", "ds_bitter7.oneshot", str(ckpt), str(tmp_path / "small"), "--sparsity", "0.75",
            "--score", "bitter7", "--scope", "standardized", "--compensation", "least_squares",
            "--calibration", corpus, "--validation", corpus, "--batch_size", "2",
            "--num_batches", "2", "--eval_batches", "2", "--report", str(tmp_path / "report.json")]


def check_oneshot(tmp_path):
    """Two ranks loaded the checkpoint (its 50% stays pruned) at the training run's block length
    and removed 75% in one event."""
    from transformers import AutoModelForCausalLM

    import ds_bitter7  # noqa: F401  registers bitter7_gpt2 (layers of different widths)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2 and report["scope"] == "standardized"
    assert report["seq_len"] == 32  # no --seq_len: the one launch/train.py recorded in the checkpoint
    assert report["event"]["sparsity"] == {"mlp_neuron": pytest.approx(0.75)}
    assert report["event"]["compensation"]["mode"] == "least_squares"
    assert report["ppl_after"] > 1 and report["params_after"] < report["params_before"]
    small = AutoModelForCausalLM.from_pretrained(str(tmp_path / "small"))
    assert sum(p.numel() for p in small.parameters()) == report["params_after"]


def test_oneshot_under_deepspeed_launcher(trained, tmp_path):
    oneshot = oneshot_args(trained, tmp_path)
    run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
         *oneshot[1:]], tmp_path)
    check_oneshot(tmp_path)


@needs_mpirun
def test_oneshot_under_mpirun(trained, tmp_path):
    """With a one-rank group's variables left in the environment (a shell inside another job):
    MPI's ranks win, where DeepSpeed would skip its MPI discovery and start two rank-0 processes."""
    stale = [arg for var in ("RANK=0", "WORLD_SIZE=1", "LOCAL_RANK=0", "MASTER_ADDR=127.0.0.1") for arg in ("-x", var)]
    run([*mpirun(2), *stale, str(VENV_BIN / "python"), *oneshot_args(trained, tmp_path)], tmp_path)
    check_oneshot(tmp_path)


FAILS_ALONE = """
import sys
from ds_bitter7 import checkpoint_loading, oneshot
checkpoint_loading.zero_file_problems = lambda *a: []  # the truncation unseen: rank 1 fails inside DeepSpeed's loading
sys.exit(oneshot.main([sys.argv[1], sys.argv[2], "--sparsity", "0.5", "--score", "bitter7"]))
"""


@needs_mpirun
def test_mpirun_rank_failing_alone_stops_the_job(trained, tmp_path):
    """Rank 1 cannot read its optimizer file while rank 0 loads on into a collective: without
    MPI_Abort rank 1 blocks in MPI_Finalize and rank 0 waits forever (the entry points run inside
    comm.abort_job_on_error; one-shot checks the files first, switched off here)."""
    import subprocess

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained[2], ckpt)
    rank1 = next(ckpt.glob("global_step*/zero_pp_rank_1_*optim_states.pt"))
    rank1.write_bytes(rank1.read_bytes()[:1000])
    proc = subprocess.run([*mpirun(2), str(VENV_BIN / "python"), "-c", FAILS_ALONE, str(ckpt), str(tmp_path / "out")],
                          cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "PytorchStreamReader failed" in proc.stdout + proc.stderr


def test_shell_launchers_are_executable():
    for name in ("run_deepspeed.sh", "run_torchrun.sh", "run_mpirun.sh", "run_multinode.sh"):
        assert (REPO / "launch" / name).stat().st_mode & 0o111


def _launch_line(tmp_path, script: str, gpus: int, fails: bool = False, **env_vars) -> str:
    """What ``launch/SCRIPT`` runs, with stub launchers that print their arguments and
    GLOO_SOCKET_IFNAME, and a stub ``nvidia-smi`` listing ``gpus`` GPUs (the first with a MIG device).
    With ``fails``: the script's error, when it refuses to launch (exit 2)."""
    import subprocess

    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in ("deepspeed", "torchrun", "mpirun"):
        (stubs / name).write_text(f'#!/bin/bash\necho "{name} $* GLOO=${{GLOO_SOCKET_IFNAME:-unset}}"\n')
        (stubs / name).chmod(0o755)
    lines = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i})\\n" + ("  MIG 1g.18gb Device 0: (UUID: MIG-0)\\n" if i == 0 else "")
                    for i in range(gpus))
    smi = stubs / "nvidia-smi"
    smi.write_text(f'#!/bin/bash\nprintf "{lines}"\n' if gpus else "#!/bin/bash\nexit 9\n")
    smi.chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES", "NPROC")}
    env_ = dict(keep, PATH=f"{stubs}{os.pathsep}{keep['PATH']}", VIRTUAL_ENV="stubbed", **env_vars)
    out = subprocess.run(["bash", str(REPO / "launch" / script), "--demo"], env=env_, capture_output=True,
                         text=True, timeout=30)
    if fails:
        assert out.returncode == 2 and not out.stdout, (out.stdout, out.stderr)
        return out.stderr.strip()
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_shell_launchers_use_the_visible_gpus_and_a_real_interface_across_nodes(tmp_path):
    """CUDA_VISIBLE_DEVICES sets the ranks per node, and the deepspeed launcher gets those GPUs
    (--num_gpus would make it use GPUs 0..N-1); MIG lines do not count as GPUs; on CPU, gloo gets
    the loopback interface on one node only."""
    assert "--nproc_per_node 3 " in _launch_line(tmp_path, "run_torchrun.sh", 3)
    assert "--nproc_per_node 2 " in _launch_line(tmp_path, "run_torchrun.sh", 3, CUDA_VISIBLE_DEVICES="1,2")
    line = _launch_line(tmp_path, "run_deepspeed.sh", 3, CUDA_VISIBLE_DEVICES="1,2")
    assert line.startswith("deepspeed --include localhost:1,2 ") and "--num_gpus" not in line
    assert _launch_line(tmp_path, "run_deepspeed.sh", 0).startswith("deepspeed --num_gpus 2 ")
    assert _launch_line(tmp_path, "run_torchrun.sh", 0).endswith("GLOO=lo")
    assert _launch_line(tmp_path, "run_torchrun.sh", 0, NNODES="2", NODE_RANK="1",
                        MASTER_ADDR="10.0.0.1").endswith("GLOO=unset")
    assert _launch_line(tmp_path, "run_mpirun.sh", 0, HOSTS="a:1,b:1").endswith("GLOO=unset")


def test_shell_launchers_refuse_an_incomplete_multinode_setup(tmp_path):
    """Refused before launching: two nodes without NODE_RANK or node 0's address (torchrun waited
    silently, both nodes as rank 0), or a missing hostfile (DeepSpeed's runner trained on this
    node alone)."""
    assert "needs NODE_RANK" in _launch_line(tmp_path, "run_torchrun.sh", 0, True, NNODES="2")
    assert "NODE_RANK=2 is not a node rank of NNODES=2 (0..1)" in _launch_line(
        tmp_path, "run_torchrun.sh", 0, True, NNODES="2", NODE_RANK="2", MASTER_ADDR="10.0.0.1")
    assert "reaches this node only" in _launch_line(tmp_path, "run_torchrun.sh", 0, True, NNODES="2",
                                                    NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    missing = tmp_path / "hostfile"
    assert f"hostfile {missing} not found" in _launch_line(tmp_path, "run_multinode.sh", 0, True,
                                                           HOSTFILE=str(missing), MASTER_ADDR="10.0.0.1")
    missing.write_text("node-0 slots=2\nnode-1 slots=2\n")
    assert _launch_line(tmp_path, "run_multinode.sh", 0, HOSTFILE=str(missing),
                        MASTER_ADDR="10.0.0.1").startswith(f"deepspeed --hostfile {missing} ")


def test_save_dir_check_compares_folders_not_strings(tmp_path):
    """--resume DIR/ continues --save_dir DIR (one folder written two ways); any other run into a
    folder that holds checkpoints is refused, with the tag it holds."""
    import importlib.util
    from argparse import Namespace

    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert train.save_dir_problem(Namespace(save_dir=str(ckpt), resume=None)) is None  # no checkpoint yet
    (ckpt / "latest").write_text("global_step8")
    assert train.save_dir_problem(Namespace(save_dir=str(ckpt), resume=f"{ckpt}/")) is None
    for resume in (None, str(tmp_path / "other")):
        problem = train.save_dir_problem(Namespace(save_dir=str(ckpt), resume=resume))
        assert problem.startswith(f"--save_dir '{ckpt}' already holds checkpoints (latest: global_step8)")


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    """Values checked when the arguments are parsed (the same on every rank), paths once the ranks
    have started (``path_problems``): the run would otherwise fail after training (a --save_dir or
    --summary path of the wrong kind), fail without naming the option, or report a made-up
    perplexity (--eval_batches 0)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    (tmp_path / "afile").write_text("x")
    base = ["--config", str(REPO / "ds_configs" / "zero2_bitter7.json")]
    for extra, needle in ((["--steps", "-3"], "--steps must be >= 0, got -3"),
                          (["--eval_batches", "0"], "--eval_batches must be >= 1, got 0"),
                          (["--seq_len", "1"], "--seq_len must be >= 2, got 1"),
                          (["--model_overrides", "{n_layer: 2}"], "--model_overrides is not valid JSON"),
                          (["--model_overrides", "[2]"], "--model_overrides must be a JSON object"),
                          (["--deepspeed_config", str(REPO / "ds_configs" / "cpu_demo.json")],
                           "name different configs: give one"),
                          # the launch scripts pass --config (or --deepspeed_config) before the user's
                          # arguments: a second one replaced CONFIG's without a word
                          (["--config=" + str(REPO / "ds_configs" / "cpu_demo.json")], "name different configs")):
        with pytest.raises(SystemExit):
            train.parse_args(base + extra)
        assert needle in capsys.readouterr().err, extra
    # the paths: on each rank once the ranks have started (a node's disk may differ from the others')
    for extra, needle in ((["--save_dir", str(tmp_path / "afile")], "is a file, not a folder"),
                          (["--summary", str(tmp_path)], "is a folder: name a file"),
                          (["--save_dir", str(tmp_path / "afile" / "ckpt")], "afile' is a file, not a folder"),
                          (["--summary", str(tmp_path / "afile" / "s.json")], "afile' is a file, not a folder"),
                          (["--resume", str(tmp_path / "afile")], "is a file, not a folder"),
                          # it went on to the hub (a name there?), built the data, and said "no checkpoint in it"
                          (["--resume", str(tmp_path / "not_yet")], "does not exist"),
                          # the summary replaced the run's own data, config or checkpoint files
                          (["--data", str(tmp_path / "afile"), "--summary", str(tmp_path / "afile")],
                           "which this run reads: name another file"),
                          (["--summary", base[1]], "which this run reads"),
                          # its config.json and the rest were read as data at the resume
                          (["--data", str(tmp_path), "--save_dir", str(tmp_path)], "is a --data folder"),
                          (["--save_dir", str(tmp_path), "--summary", str(tmp_path / "latest")],
                           "would replace a file of the checkpoints in"),
                          (["--resume", str(tmp_path), "--summary", str(tmp_path / "global_step4" / "s.json")],
                           "would replace a file of the checkpoints in")):
        problems = train.path_problems(train.parse_args(base + extra), rank=0)
        assert any(needle in p for p in problems), (extra, problems)
        if "--summary" in extra and "--save_dir" not in extra and "--resume" not in extra:
            assert not train.path_problems(train.parse_args(base + extra), rank=1)  # only rank 0 writes it
    for ok in (["--save_dir", str(tmp_path), "--summary", str(tmp_path / "reports" / "summary.json")],
               ["--resume", str(tmp_path), "--summary", str(tmp_path / "summary.json")]):
        assert not train.path_problems(train.parse_args(base + ok), rank=0)  # beside the checkpoints, or in a folder of the user's there: fine
    args = train.parse_args(base + ["--model_overrides", '{"n_layer": 2}', "--deepspeed_config", base[1]])
    assert args.model_overrides == {"n_layer": 2} and args.config == base[1]  # the same config twice
    exported = tmp_path / "exported"  # a model folder, not a checkpoint folder: its config.json is kept
    exported.mkdir()
    (exported / "config.json").write_text("{}")
    assert "holds a model (config.json) and no checkpoint" in train.save_dir_problem(
        train.parse_args(base + ["--save_dir", str(exported)]))


def test_seq_len_beyond_the_model_positions_is_named(tmp_path):
    """Refused once the model is built, on every rank, instead of an IndexError in the embedding."""
    small = json.dumps({"n_layer": 2, "n_embd": 32, "n_positions": 16})
    out = run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               *train_args(tmp_path, tmp_path / "summary.json", ["--model_overrides", small])], tmp_path, fails=True)
    assert "--seq_len 32 is longer than the model's 16 positions" in out and "IndexError" not in out


def _train_where_node_1_differs(tmp_path, flag: str, path, suffix: str, extra=()) -> str:
    """launch/train.py on two ranks given ``flag path``, where rank 1 (a node of its own) finds
    ``path`` + ``suffix`` instead: the same argument naming another file on that node. Fails."""
    per_node = (f'if [ "$RANK" = 1 ]; then d="$0{suffix}"; else d="$0"; fi; '
                f'export DS_BITTER7_SHARED_FS_WAIT=0; exec "$@" {flag} "$d"')  # a local disk: no cached lookups
    return run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "--no-python",
                "sh", "-c", per_node, str(path), str(VENV_BIN / "python"),
                *train_args(tmp_path, tmp_path / "summary.json", extra)], tmp_path, fails=True)


@pytest.mark.parametrize("node_1", ["file", "own"])
def test_a_save_folder_refused_on_one_node_stops_every_rank(tmp_path, node_1):
    """A --save_dir that is a file on one node only, or a folder of that node's own disk: refused
    once the ranks have started, on every rank. Checked in parse_args, that node exited alone and
    the others waited for it in DeepSpeed's start until the store timed out; a folder per node was
    found only at resume, when no node held a whole checkpoint."""
    (tmp_path / "ckpt.file").write_text("x")
    out = _train_where_node_1_differs(tmp_path, "--save_dir", tmp_path / "ckpt", f".{node_1}")
    if node_1 == "file":
        assert f"--save_dir '{tmp_path / 'ckpt.file'}' is a file, not a folder" in out, out[-3000:]
        assert "another rank refuses the arguments' paths (see that rank's error)" in out, out[-3000:]
        assert not (tmp_path / "ckpt").exists()
    else:
        assert f"--save_dir '{tmp_path / 'ckpt'}' is not on a file system every node sees: rank(s) 1 do not" in out
        assert f"--save_dir '{tmp_path / 'ckpt.own'}' is not on a file system every node sees: rank(s) 1" in out
    assert not (tmp_path / "summary.json").exists()


def test_a_tokenizer_saved_on_one_node_only_is_refused(tmp_path):
    """The run's tokenizer beside --resume on one node only: that node tokenized bytes, the
    others the saved tokenizer (models of different vocabularies, a split start)."""
    write_word_tokenizer(tmp_path / "run")
    (tmp_path / "run.bare").mkdir()
    out = _train_where_node_1_differs(tmp_path, "--resume", tmp_path / "run", ".bare",
                                      ["--save_dir", str(tmp_path / "ckpt")])
    assert f"the ranks find different tokenizers beside --resume / --model (this rank: {tmp_path / 'run'})" in out
    assert "(this rank: bytes): a node misses the saved files; pass --tokenizer" in out


def test_a_wrong_data_tokenizer_or_model_is_one_line_on_every_rank(tmp_path):
    """Each rank printed its traceback, the message buried in about a hundred lines."""
    python = str(VENV_BIN / "python")
    base = ["launch/train.py", "--config", str(tiny_ds_config(tmp_path / "ds.json")), *TINY_MODEL, "--seq_len", "32",
            "--steps", "1", "--calibration_batches", "0"]
    out = run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *base,
               "--data", str(tmp_path / "mydata.txt")], tmp_path, fails=True)
    assert f"building the data: ValueError: data path {str(tmp_path / 'mydata.txt')!r} does not exist" in out
    assert "failed on another rank; see that rank's error" in out
    assert 'train.py", line' not in out, out  # torchrun's own traceback follows: a child failed
    for extra, needle in ((["--tokenizer", str(tmp_path / "no_tokenizer")], "loading the tokenizer: "),
                          (["--model", "tiny-gtp2"], "building the model: ValueError: model 'tiny-gtp2'")):
        out = run([python, *base, "--data", "builtin", *extra], tmp_path, fails=True)
        assert needle in out and "Traceback" not in out, out


def test_resume_with_another_model_is_named(trained):
    """A --model_overrides left out at resume: the shapes that differ are named before DeepSpeed's
    loading (which failed on every rank with a size-mismatch traceback)."""
    saved = modeling.saved_model_config(str(trained[2]))
    same = modeling.build_config("tiny-gpt2", 257, overrides=json.loads(TINY_MODEL[-1]))
    assert modeling.model_mismatch(saved, same) is None
    assert modeling.model_mismatch(saved, modeling.build_config("tiny-gpt2", 257)) == \
        "n_layer=2 where this run's has 4, n_embd=32 where this run's has 128"
    # a longer --seq_len than the position table, a bias left out: named too (they failed inside DeepSpeed)
    longer = modeling.build_config("tiny-gpt2", 257, max_positions=300, overrides=json.loads(TINY_MODEL[-1]))
    assert modeling.model_mismatch(saved, longer) == "n_positions=256 where this run's has 300"
    llama = modeling.build_config("tiny-llama", 257, overrides={"attention_bias": True})
    llama.save_pretrained(str(trained[2].parent / "llama_saved"))
    assert "attention_bias=True where this run's has False" in modeling.model_mismatch(
        modeling.saved_model_config(str(trained[2].parent / "llama_saved")), modeling.build_config("tiny-llama", 257))
    assert modeling.saved_model_config(str(trained[2].parent / "nothing_here")) == {}
    empty = trained[2].parent / "empty_config"  # a truncated copy: the check above was skipped without a word
    empty.mkdir(exist_ok=True)
    (empty / "config.json").write_text("")
    with pytest.raises(ValueError, match="empty_config/config.json cannot be read .*copy it again"):
        modeling.saved_model_config(str(empty))
    from ds_bitter7.models import Bitter7GPT2Config  # an export resumed with another export's widths

    export = Bitter7GPT2Config(n_layer=2, n_embd=32, n_head=4, intermediate_sizes=[10, 20], num_heads_per_layer=[4, 2])
    other = Bitter7GPT2Config(n_layer=2, n_embd=32, n_head=4, intermediate_sizes=[10, 30], num_heads_per_layer=[4, 2])
    assert modeling.model_mismatch(export.to_dict(), other) == "intermediate_sizes=[10, 20] where this run's has [10, 30]"


def test_resume_refuses_a_stale_universal_tag_and_another_tokenizer(tmp_path):
    """load_universal left on after the resumed run saved on reloaded the converted, older tag
    (steps redone, the newer checkpoint abandoned); resuming a word-tokenizer run on bytes (or the
    reverse) trained on ids that mean other text, with no word."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    (tmp_path / "latest_universal").write_text("global_step4_universal")
    (tmp_path / "latest").write_text("global_step4")
    assert train.stale_universal(str(tmp_path)) is None  # the first resume after the conversion
    (tmp_path / "latest").write_text("global_step6")
    assert 'remove "checkpoint": {"load_universal": true}' in train.stale_universal(str(tmp_path))
    assert train.stale_universal(str(tmp_path / "nowhere")) is None
    refused, warned = dsdata.tokenizer_change("runs/tok", "bytes")
    assert "pass --tokenizer runs/tok" in refused and warned is None
    assert "pass --tokenizer bytes" in dsdata.tokenizer_change("bytes", "tok")[0]
    assert "make sure they are the same" in dsdata.tokenizer_change("runs/tok", "elsewhere/tok")[1]
    assert dsdata.tokenizer_change(None, "bytes") == dsdata.tokenizer_change("bytes", "bytes") == (None, None)


def test_resume_under_another_zero_stage_is_named(trained):
    """A ZeRO-2 checkpoint resumed at stage 0 failed inside DeepSpeed's loading with an
    AttributeError; stage 1 reads stage 2's files."""
    from ds_bitter7.checkpoint_files import checkpoint_problems

    _, _, ckpt = trained
    problems = checkpoint_problems(str(ckpt), world_size=2, zero_stage=0)
    assert len(problems) == 1 and "was saved with ZeRO stage 2 (its optimizer state is in *optim_states.pt), " \
        "but this run has ZeRO stage 0: resume with stage 1 or 2" in problems[0], problems
    assert checkpoint_problems(str(ckpt), world_size=2, zero_stage=1) == []
    assert checkpoint_problems(str(ckpt), world_size=2, zero_stage=2, bf16=False) == []
    # with bf16 on, DeepSpeed looks for bf16_zero_pp_rank_* files: a bare FileNotFoundError on every rank
    problems = checkpoint_problems(str(ckpt), world_size=2, zero_stage=2, bf16=True)
    assert len(problems) == 1 and "this run enables bf16, but checkpoint" in problems[0] and \
        "can only load it with bf16 off" in problems[0], problems


def test_resume_from_a_corrupt_rank_file_is_named(trained, tmp_path):
    """A rank file whose archive directory is whole but whose pickle is not (a bad copy) failed
    inside DeepSpeed's loading on that rank with a UnicodeDecodeError, the other rank with a
    closed connection; its CRC names it on every rank before DeepSpeed's loading."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained[2], ckpt)
    rank_file = ckpt / f"global_step{STEPS}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(rank_file, "r+b") as f:
        f.seek(300)
        f.write(b"\xff" * 200)
    out = run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               *train_args(tmp_path, tmp_path / "s.json", ["--resume", str(ckpt), "--steps", str(STEPS + 2)])],
              tmp_path, fails=True)
    assert out.count(f"cannot resume from {str(ckpt)!r}: {str(rank_file)!r} is truncated or corrupt (Bad CRC-32") == 2, \
        out[-3000:]


def test_a_model_with_nan_weights_is_not_saved_over_the_last_checkpoint(trained, tmp_path):
    """Damaged tensor bytes in a rank file load (only the pickle's CRC is checked): the resumed
    run's weights turn NaN, and its save moved 'latest' onto them. The save is refused instead."""
    import zipfile

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained[2], ckpt)
    rank_file = ckpt / f"global_step{STEPS}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(rank_file) as archive:  # the largest tensor: the fp32 master partition
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(rank_file, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(b"\xff" * info.file_size)  # NaN in every element
    out = run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               *train_args(tmp_path, tmp_path / "s.json", ["--resume", str(ckpt), "--save_dir", str(ckpt),
                                                           "--steps", str(STEPS + 2)])], tmp_path, fails=True)
    assert f"not saving step {STEPS + 2} in {str(ckpt)!r}: the model's weights hold NaN or Inf" in out, out[-3000:]
    assert (ckpt / "latest").read_text().strip() == f"global_step{STEPS}"
    assert not (ckpt / f"global_step{STEPS + 2}").exists()


def _data_failing_on_rank_1() -> str:
    """launch/train.py's rank0_first with a data error on rank 1 only (its node lacks a file)."""
    import importlib.util

    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    def build():
        if dist.get_rank() == 1:
            raise FileNotFoundError("data path 'corpus.txt' does not exist")
        return "blocks"

    try:
        return f"built {train.rank0_first(build, dist.get_rank())}"
    except Exception as err:  # noqa: BLE001 - the test compares what each rank got
        return f"{type(err).__name__}: {err}"


def _folders_seen_by_rank_0(root: str) -> list:
    """cli.unshared_problem for one folder all ranks see, then for one of each rank's own (a
    folder on each node's local disk: emulated by a path per rank)."""
    import torch.distributed as dist

    from ds_bitter7.cli import unshared_problem

    own = os.path.join(root, f"node{dist.get_rank()}", "ckpt")
    os.environ["DS_BITTER7_SHARED_FS_WAIT"] = "0"  # a local disk caches no lookup: no need to wait
    return [unshared_problem(os.path.join(root, "shared"), "--save_dir"), unshared_problem(own, "--save_dir"),
            sorted(os.listdir(os.path.join(root, "shared")))]


def test_a_save_folder_local_to_each_node_is_refused_at_start(tmp_path):
    """A --save_dir on each node's own disk left no node a whole checkpoint, found only at resume."""
    from distributed import run_distributed

    first, second = run_distributed(_folders_seen_by_rank_0, 2, str(tmp_path), timeout=90)
    assert first[0] is None and first[2] == []  # made by rank 0; its marker removed
    assert second[0] is None and "node1" in second[1] and "rank(s) 1 do not see a file rank 0 wrote" in second[1]
    assert first[1] == (f"--save_dir '{tmp_path / 'node0' / 'ckpt'}' is not on a file system every node sees: "
                        "rank(s) 1 do not see a file rank 0 wrote there. Each rank writes its own ZeRO files into it "
                        "and rank 0 the rest, so no node would hold a whole checkpoint: put it on a file system "
                        "shared by all nodes")
    assert not (tmp_path / "node1").exists()  # only rank 0 makes the folder


def test_data_error_on_one_rank_stops_every_rank():
    """Rank 0 went on to DeepSpeed's start and waited there for good (two nodes, one without a file)."""
    from distributed import run_distributed

    first, second = run_distributed(_data_failing_on_rank_1, 2, timeout=90)
    assert first == "RuntimeError: building the data failed on another rank; see that rank's error", first
    assert second == "FileNotFoundError: data path 'corpus.txt' does not exist", second
