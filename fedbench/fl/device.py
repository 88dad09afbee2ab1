"""Where a run computes: ``train.device`` resolved to a torch device, CUDA's deterministic settings, bf16 autocast.

The model, its batches and the activation caches live on the run's device; every trainable state that leaves
the model (client updates, the global model, the client store, checkpoints, Flower records) is a CPU tensor
(:func:`fedbench.models.trainable_state` copies to the CPU), so aggregation, the update guard, checkpoints and
the engines never see a device. On the CPU nothing changes: ``.to(cpu)`` of a CPU tensor is the tensor itself.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from fedbench.errors import ConfigError

# cuBLAS reads this once, when its handle is created (the first CUDA matmul of the process, which may come before
# a run resolves its device): set here so that a deterministic cuBLAS is possible; it changes nothing on a CPU
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(train_cfg) -> torch.device:
    """``train.device`` as a torch device: 'auto' = CUDA device 0 when torch sees one, else the CPU.

    Raises ConfigError before any work when CUDA is asked for but absent, the index is out of range, or bf16
    autocast would run on the CPU (``train.device='auto'`` on a machine without CUDA)."""
    name = train_cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device", train_cfg.device, "'auto' or 'cpu' (torch sees no CUDA device here)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("train.device", train_cfg.device,
                              f"a CUDA index below {torch.cuda.device_count()} (the devices torch sees)")
        deterministic_cuda()
    if train_cfg.precision == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision", train_cfg.precision,
                          f"'fp32' when train.device={train_cfg.device!r} resolves to the CPU (bf16 autocast is "
                          "CUDA only: CPU bf16 matmuls are ~100x slower than fp32)")
    return device


def deterministic_cuda() -> None:
    """Deterministic CUDA kernels where torch has them: cuBLAS' fixed workspace (set at import), no TF32 (fp32 stays fp32),
    cuDNN deterministic; ops without a deterministic kernel warn rather than fail (``warn_only``)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(precision: str, device: torch.device):
    """bf16 autocast around a forward pass when `precision` (``train.precision``) is 'bf16' (on CUDA; the
    parameters, so the adapters and the optimizer state, stay fp32); a no-op context otherwise."""
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
