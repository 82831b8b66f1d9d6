#!/usr/bin/env bash
# One-shot CUDA check: the GPU tests (`-m gpu`: vectorised environments, widening and decay on CUDA) and the overlap
# benchmark. Meant for a fresh, offline GPU machine holding a copy of the repository tree
# (ignored folders such as .venv may be absent): nothing is installed, the tree's own src/ is
# used through PYTHONPATH, and whatever is missing is reported instead.
#
#     OUT=/some/folder bash bench/gpu_check.sh      # OUT defaults to ./gpu_check_out
#
# The first of .venv/bin/python, python3, python whose torch sees CUDA runs everything;
# GPU_CHECK_PYTHON=/path/to/python forces one (even without CUDA: a dry run of the script).
#
# Every step has its own timeout and later steps run even when one fails (set -u, not set -e);
# the whole script stays under ~9 minutes. Logs land in $OUT: summary.txt, env.txt,
# nvidia-smi.txt, pytest-gpu.txt, bench-vector_env.txt, train-throughput.txt.
set -u

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
START=$SECONDS

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LOGFILE TIMEOUT_S CMD...: run CMD with a timeout, log it, record rc and seconds.
step() {
    local name=$1 log=$2 limit=$3
    shift 3
    local t0=$SECONDS
    echo "=== $name: $* (timeout ${limit}s)" | tee -a "$OUT/$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    local why=""
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why=" (TIMED OUT)"; fi
    note "step $name: rc=$rc$why, $((SECONDS - t0)) s"
    return 0
}

note "gpu_check.sh in $PWD at $(date -u '+%Y-%m-%d %H:%M:%S UTC'); outputs in $OUT"

# 1. The GPU -----------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
    step nvidia-smi nvidia-smi.txt 30 nvidia-smi -L
    timeout 30 nvidia-smi >>"$OUT/nvidia-smi.txt" 2>&1
else
    note "nvidia-smi: not found"
fi

# 2. A Python with a CUDA torch ----------------------------------------------------------------
PY=""
for cand in .venv/bin/python python3 python; do
    if [ "$cand" = .venv/bin/python ]; then
        [ -x "$cand" ] || continue
    else
        command -v "$cand" >/dev/null 2>&1 || continue
    fi
    line=$(timeout 90 "$cand" -c \
        "import torch; print(torch.__version__, torch.cuda.is_available(), torch.version.cuda)" \
        2>&1 | tail -n 1)
    note "python candidate $cand ($("$cand" --version 2>&1)): torch version, cuda available, cuda = $line"
    if [ -z "$PY" ] && [ "$(echo "$line" | awk '{print $2}')" = True ]; then
        PY=$cand
    fi
done
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY=$GPU_CHECK_PYTHON
    note "GPU_CHECK_PYTHON: $PY ($(timeout 90 "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available())" 2>&1 | tail -n 1))"
fi
if [ -z "$PY" ]; then
    note "NO PYTHON WITH A CUDA-ENABLED TORCH: nothing more can run (no network to install one)."
    note "total $((SECONDS - START)) s"
    exit 0
fi
note "using $PY"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

timeout 120 "$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'
import importlib
missing = []
for name in ["torch", "numpy", "typer", "rich", "safetensors", "sklearn", "hypothesis", "pytest"]:
    try:
        module = importlib.import_module(name)
        print(f"ok      {name} {getattr(module, '__version__', '')}")
    except Exception as e:
        missing.append(name)
        print(f"MISSING {name}: {type(e).__name__}: {e}")
try:
    import esper.tolaria.vector  # from src/, through PYTHONPATH
    print("ok      esper (src/)")
except Exception as e:
    missing.append("esper")
    print(f"MISSING esper: {type(e).__name__}: {e}")
print("missing:", " ".join(missing) if missing else "none")
EOF
cat "$OUT/env.txt"
note "imports: $(tail -n 1 "$OUT/env.txt")"
have() { grep -q "^ok      $1" "$OUT/env.txt"; }

# 3. The GPU tests -----------------------------------------------------------------------------
if have pytest; then
    # -m gpu overrides the default "not slow and not gpu"; a test module whose imports are
    # missing here is reported and skipped rather than stopping the collection.
    step pytest-gpu pytest-gpu.txt 120 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
        --continue-on-collection-errors tests
else
    note "step pytest-gpu: skipped, pytest is missing"
fi

# 4. The benchmark: in-process overlap on and off vs the sequential baseline, K = 1, 16, 64 -----
if have rich && have sklearn && have esper; then
    # --progress prints every run as it ends, so a timeout still leaves numbers behind.
    step bench-vector_env bench-vector_env.txt 210 "$PY" bench/vector_env.py --device cuda \
        --ks 1 16 64 --ticks 6 --repeats 3 --backends inprocess --progress
else
    note "step bench-vector_env: skipped, it needs rich, sklearn (the digits data) and esper"
fi

# 5. Phase 1 training throughput on CUDA: a short PPO run (no warm start), environment ticks/s --
if have rich && have sklearn && have esper; then
    step train-throughput train-throughput.txt 180 "$PY" bench/train_throughput.py --device cuda
else
    note "step train-throughput: skipped, it needs rich, sklearn and esper"
fi

note "total $((SECONDS - START)) s"
exit 0
