"""What each client keeps between its rounds without sending it, with a safe serialisation (no pickle).

A :class:`ClientStore` maps a client id to a plain dict: tensors (private LoRA factors, per-task adapters,
personal heads) and JSON values (the DP ledger: accountant history, calibration, epsilon spent). Clients
stay cheap: the loop holds data indices + this store per client, never a model copy.

On disk and on the wire a store is two parts: the tensors as a flat ``{"<client>/<name>": tensor}`` dict
(safetensors, or a Flower ``ArrayRecord``) and everything else as JSON. JSON turns tuples into lists; a
reader that needs a tuple converts it back (the DP ledger does).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TENSORS_FILE, META_FILE = "store.safetensors", "store.json"


def split_payload(d: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A (possibly nested) dict as (flat tensors keyed by '/'-joined paths, the JSON rest)."""
    tensors, rest = {}, {}

    def walk(node, path, out):
        for k, v in node.items():
            if not isinstance(k, str) or "/" in k:
                raise ValueError(f"store keys must be strings without '/': {k!r}")
            if isinstance(v, torch.Tensor):
                tensors["/".join([*path, k])] = v.detach().contiguous().clone()
            elif isinstance(v, dict):
                out[k] = {}
                walk(v, [*path, k], out[k])
            else:
                out[k] = v
    walk(d, [], rest)
    json.dumps(rest)             # fail here, naming nothing half-written, if a value is not JSON-able
    return tensors, rest


def join_payload(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of :func:`split_payload`."""
    out = json.loads(json.dumps(rest))
    for path, t in tensors.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = t
    return out


class ClientStore:
    """{client id: dict of what that client keeps}. ``store[c]`` creates an empty dict on first use."""

    def __init__(self, data: dict[int, dict] | None = None):
        self._data: dict[int, dict] = {int(k): v for k, v in (data or {}).items()}

    def __getitem__(self, client_id: int) -> dict:
        return self._data.setdefault(int(client_id), {})

    def __contains__(self, client_id) -> bool:
        return int(client_id) in self._data

    def ids(self) -> list[int]:
        return sorted(self._data)

    def items(self):
        return sorted(self._data.items())

    # -- serialisation --------------------------------------------------------------------------------
    def to_payload(self) -> tuple[dict[str, torch.Tensor], dict]:
        return split_payload({str(c): d for c, d in self.items()})

    @classmethod
    def from_payload(cls, tensors: dict, rest: dict) -> "ClientStore":
        return cls({int(c): d for c, d in join_payload(tensors, rest).items()})

    def save(self, folder: str | Path) -> None:
        """Write the store into `folder` (each file atomically)."""
        from fedbench.results import atomic_write_json, atomic_write_tensors
        tensors, rest = self.to_payload()
        atomic_write_tensors(Path(folder) / TENSORS_FILE, tensors)
        atomic_write_json(Path(folder) / META_FILE, rest)

    @classmethod
    def load(cls, folder: str | Path) -> "ClientStore":
        from fedbench.results import read_tensors
        folder = Path(folder)
        return cls.from_payload(read_tensors(folder / TENSORS_FILE), json.loads((folder / META_FILE).read_text()))
