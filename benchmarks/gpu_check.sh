#!/usr/bin/env bash
# One-GPU check of ds_bitter7 (about 8 minutes at most): the machine, the overhead benchmark on
# the GPU, a few hundred steps of the reference workload (launch/train.py, tiny GPT-2 on the
# built-in corpus, ZeRO-2, bf16, pruning neurons and heads with least squares on the training
# window), one-shot pruning of its checkpoint (bitter7_obs, least squares) in one calibration
# pass and one layer per pass (the two outputs must be bit-identical), the F x F statistics'
# memory on the GPU in one pass and one layer per pass, and the cost of the obs greedy on the GPU.
# Every figure goes to one file, $OUT_DIR/gpu/gpu_check.txt.
#
#   bash benchmarks/gpu_check.sh
#   SECTIONS="train oneshot passes" bash benchmarks/gpu_check.sh   # a subset
#
# Environment (all optional):
#   OUT_DIR  results go to $OUT_DIR/gpu/, emptied first (default benchmarks/results)
#   PYTHON   a Python that already has the project installed: no venv, no pip
#   VENV     venv to create/use otherwise (default .venv-gpu). When the system python3 already
#            has a CUDA torch, the venv sees it (--system-site-packages): CPU torch is never installed.
#   STEPS    training steps of the reference workload (default 300)
#   SECTIONS the checks to run, in this order whatever the order given (default all): overhead,
#            train, oneshot (needs train), passes (needs oneshot), stats, obs, gloo
#   TOTAL_LIMIT  seconds for the whole script (default 470): each section's limit is cut to what is left
#   OBS_WIDTHS, OBS_WIDE  MLP widths of the two obs cost sections (default "2048 4096" and 11008,
#            LLaMA-7B's)
#   COMMIT   the commit to name in the report (default: git rev-parse, where .git is there)
#   PIP_FIND_LINKS / PIP_NO_INDEX  pip's own variables, for an offline wheel folder
# Network: only pip's, during the install section. Each section has its own time limit; a failed
# section is logged and the script goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-benchmarks/results}
STEPS=${STEPS:-300}
SECTIONS=${SECTIONS:-overhead train oneshot passes stats obs gloo}
VENV=${VENV:-.venv-gpu}
TOTAL_LIMIT=${TOTAL_LIMIT:-470}
REPORT="$OUT_DIR/gpu/gpu_check.txt"
rm -rf "$OUT_DIR/gpu"  # this script's own outputs of an earlier run
mkdir -p "$OUT_DIR/gpu"
: >"$REPORT"
export TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR  # let DeepSpeed find the GPU

log() { echo "$*" | tee -a "$REPORT"; }

# section NAME SECONDS COMMAND...: run with a time limit (cut to what is left of TOTAL_LIMIT),
# output into the report, never abort.
section() {
  local name=$1 limit=$2 start=$SECONDS rc=0 left=$((TOTAL_LIMIT - SECONDS))
  shift 2
  log ""
  if [ "$left" -lt 15 ]; then
    log "=== $name: SKIPPED (only ${left} s left of TOTAL_LIMIT=${TOTAL_LIMIT})"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  log "=== $name (limit ${limit} s) ==="
  timeout --kill-after=15 "$limit" "$@" >>"$REPORT" 2>&1 || rc=$?
  log "--- $name: exit code $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
  return 0
}

install_env() {
  if [ -n "${PYTHON:-}" ]; then
    echo "using PYTHON=$PYTHON as is"
    return 0
  fi
  local sys_py
  sys_py=$(command -v python3)
  if [ ! -x "$VENV/bin/python" ]; then
    if "$sys_py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      echo "system python3 has a CUDA torch: venv with --system-site-packages"
      "$sys_py" -m venv --system-site-packages "$VENV"
      # python3 may itself live in a venv, whose packages --system-site-packages does not reach:
      # a .pth file puts its site-packages (torch) after the new venv's own.
      local parent child
      parent=$("$sys_py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      child=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      [ "$parent" = "$child" ] || echo "$parent" >"$child/_gpu_check_parent_site.pth"
    else
      echo "no CUDA torch in the system python3: plain venv (pip installs torch's default CUDA build)"
      "$sys_py" -m venv "$VENV"
    fi
  fi
  local py="$VENV/bin/python"
  if [ ! -x "$py" ]; then
    echo "could not create $VENV: installing into $sys_py itself"
    py=$sys_py
  fi
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null || true
  # No build isolation when setuptools is there: an isolated build of DeepSpeed's sdist could fetch torch.
  if "$py" -c "import setuptools, wheel" 2>/dev/null; then
    "$py" -m pip install --no-build-isolation -e . || "$py" -m pip install -e .
  else
    "$py" -m pip install -e .
  fi
  "$py" -m pip install matplotlib 2>/dev/null || echo "matplotlib not installed: no plot (figures unaffected)"
}

train_config() {  # the bf16 reference config with a schedule sized to $STEPS steps
  "$PY" - "$OUT_DIR/gpu/zero2_bf16_short.json" "$STEPS" <<'EOF'
import json, sys
cfg = json.load(open("ds_configs/zero2_bf16_bitter7.json"))
steps = int(sys.argv[2])
cfg["scheduler"]["params"]["warmup_num_steps"] = max(1, steps // 10)
cfg["bitter7"]["schedule"] = {"start_step": steps // 5, "end_step": 4 * steps // 5,
                              "frequency": max(1, steps // 20), "shape": "cubic"}
cfg["bitter7"]["structures"] = ["mlp_neuron", "attention_head"]
cfg["bitter7"]["bias_compensation"].update(source="training", mode="least_squares", window=4)
json.dump(cfg, open(sys.argv[1], "w"), indent=2)
print(json.dumps(cfg["bitter7"]))
EOF
}

show() { [ -f "$1" ] && cat "$1" >>"$REPORT" || log "(missing: $1)"; }
wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }

# same_files DIR_A DIR_B: two exported models' files byte-identical (else the largest tensor
# difference), all but pruning_report.json, which records the event's passes and seconds.
same_files() {
  "$PY" - "$1" "$2" <<'EOF'
import hashlib, os, sys
a, b = sys.argv[1:]
names = sorted((set(os.listdir(a)) | set(os.listdir(b))) - {"pruning_report.json"})
digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) else None
differ = [n for n in names if digest(os.path.join(a, n)) != digest(os.path.join(b, n))]
print(f"{len(names)} files, {len(differ)} differ: {differ}")
for n in (n for n in differ if n.endswith(".safetensors")):
    from safetensors.torch import load_file
    ta, tb = load_file(os.path.join(a, n)), load_file(os.path.join(b, n))
    worst = max(((ta[k].double() - tb[k].double()).abs().max().item(), k) for k in ta if k in tb)
    print(f"{n}: largest difference {worst[0]:.3g} in {worst[1]}")
sys.exit(1 if differ else 0)
EOF
}

log "ds_bitter7 GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
section "machine" 30 bash -c 'nvidia-smi; echo; nproc; grep -m1 "model name" /proc/cpuinfo; free -g'
export VENV OUT_DIR STEPS PYTHON="${PYTHON:-}"
export -f install_env train_config same_files
section "install" 180 bash -c install_env
PY=${PYTHON:-$VENV/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
log "python: $PY"
section "versions" 40 "$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('deepspeed', deepspeed.__version__, 'accelerator', deepspeed.get_accelerator().device_name()); print('transformers', transformers.__version__)"

wanted overhead && section "overhead, 1 rank, NCCL" 120 "$PY" benchmarks/overhead.py --world-sizes 1 \
  --widths 768,1536 --layers 4 --repeats 10 --backend nccl --out "$OUT_DIR/gpu/nccl1"  # prints its own table
export PY
if wanted train; then
  section "reference workload config" 30 bash -c train_config
  section "reference workload: $STEPS steps, tiny GPT-2, ZeRO-2 bf16, 1 GPU" 150 "$PY" -m torch.distributed.run \
    --standalone --nproc_per_node 1 launch/train.py --config "$OUT_DIR/gpu/zero2_bf16_short.json" \
    --model tiny-gpt2 --steps "$STEPS" --seq_len 256 --eval_every "$((STEPS / 3))" --eval_batches 16 \
    --summary "$OUT_DIR/gpu/train_summary.json" --save_dir "$OUT_DIR/gpu/checkpoint"
  show "$OUT_DIR/gpu/train_summary.json"
fi

# oneshot_run NAME [ARGS...]: 75% of the checkpoint's neurons and heads, bitter7_obs + least squares;
# the model goes to gpu/NAME_model, the summary to gpu/NAME_report.json.
oneshot_run() {
  local name=$1
  shift
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m ds_bitter7.oneshot \
    "$OUT_DIR/gpu/checkpoint" "$OUT_DIR/gpu/${name}_model" --sparsity 0.75 --structures mlp_neuron attention_head \
    --calibration builtin --validation builtin --report "$OUT_DIR/gpu/${name}_report.json" "$@"
}
export -f oneshot_run
if wanted oneshot; then
  section "one-shot 75% of the checkpoint's neurons and heads, bitter7_obs + least squares, 1 GPU" 120 \
    bash -c "oneshot_run oneshot"
  show "$OUT_DIR/gpu/oneshot_report.json"
fi
if wanted passes; then
  section "the same one-shot, F x F one layer per calibration pass (--layers_per_pass 1)" 120 \
    bash -c "oneshot_run oneshot_lpp1 --layers_per_pass 1"
  show "$OUT_DIR/gpu/oneshot_lpp1_report.json"
  section "one pass and one layer per pass wrote the same files" 60 \
    bash -c "same_files $OUT_DIR/gpu/oneshot_model $OUT_DIR/gpu/oneshot_lpp1_model"
fi

# F x F memory at LLaMA-7B's MLP width (4 blocks, 924 MiB of F x F each), obs + least squares at 75%:
# every layer's matrices in one pass, then one layer per pass (calibration only).
if wanted stats; then
  for lpp in 0 1; do
    section "F x F statistics on the GPU, width 11008, layers_per_pass $lpp" 150 "$PY" \
      benchmarks/stats_memory.py --device cuda --width 11008 --embd 1024 --seq_len 256 --event obs \
      --layers_per_pass "$lpp" --out "$OUT_DIR/gpu/stats_memory/lpp$lpp"
    show "$OUT_DIR/gpu/stats_memory/lpp$lpp.md"
  done
fi

# Two runs, so that the widest one timing out loses only its own row.
if wanted obs; then
  section "obs greedy and float64 inverses on the GPU" 120 "$PY" benchmarks/obs_cost.py --device cuda \
    --widths ${OBS_WIDTHS:-2048 4096} --repeats 1 --out "$OUT_DIR/gpu/obs_cost"
  section "obs greedy on the GPU, LLaMA-7B's MLP width" 120 "$PY" benchmarks/obs_cost.py --device cuda \
    --widths ${OBS_WIDE:-11008} --out "$OUT_DIR/gpu/obs_cost_wide"
fi

# NCCL refuses two ranks on one GPU (seen on the H200): two ranks share it over gloo.
wanted gloo && section "overhead, 2 ranks sharing the GPU, gloo" 60 "$PY" benchmarks/overhead.py --world-sizes 2 \
  --widths 768 --layers 4 --repeats 5 --backend gloo --timeout 50 --out "$OUT_DIR/gpu/gloo2"

log ""
log "report: $REPORT"
