"""From a text split to model inputs: cached tokenization, dynamic padding, length bucketing,
and the activation cache for frozen bottom layers.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class TokenizedSplit:
    """Unpadded token ids of every example (no padding stored) and the labels."""
    input_ids: list[torch.Tensor]
    labels: torch.Tensor
    # optional (n, num_classes) bool: the classes each example may take. A multi-task split over the
    # union of its tasks' label spaces (one head with every task's rows) sets it, so that each example's
    # softmax runs over its own task's classes only, which is exactly one head per task. None = all.
    class_mask: torch.Tensor | None = None
    _lengths: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        # computed once (it was ~12 ms per client update on 5k examples); token ids are never edited in place
        if self._lengths is None or len(self._lengths) != len(self.input_ids):
            self._lengths = np.fromiter((len(t) for t in self.input_ids), dtype=np.int64,
                                        count=len(self.input_ids))
        return self._lengths

    def inputs(self, indices, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's inputs for these examples: token ids padded to this batch's longest, and the mask."""
        return pad_batch([self.input_ids[int(i)] for i in indices], pad_id)


@dataclass
class ImageSplit:
    """Images kept as uint8 (n, H, W[, C]) and turned into a vision backbone's pixel_values per batch.

    Preprocessing happens per batch (resize + normalise), not up front: CIFAR at 224 x 224 float32 would
    be 30 GB. Grey images are repeated over the backbone's channels; resizing is bilinear
    (torch.nn.functional.interpolate, antialiased: no torchvision/PIL needed). `image_size`, `mean` and
    `std` come from the backbone (its config and preprocessor_config.json).
    """
    images: np.ndarray
    labels: torch.Tensor
    image_size: int
    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def lengths(self) -> np.ndarray:
        return np.ones(len(self.images), dtype=np.int64)     # every image is the same number of patches

    def inputs(self, indices, pad_id: int = 0) -> tuple[torch.Tensor, None]:
        import torch.nn.functional as F
        x = torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(indices, dtype=np.int64)]))
        x = x.to(torch.float32) / 255.0
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)         # -> (n, C, H, W)
        if x.shape[1] != self.num_channels:
            if x.shape[1] != 1:
                raise ValueError(f"images with {x.shape[1]} channels for a backbone with {self.num_channels}")
            x = x.expand(-1, self.num_channels, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std, None


def image_split(dataset, image_size: int, num_channels: int, mean, std) -> ImageSplit:
    """A `datasets` split with an ``image`` column (uint8 arrays) as an :class:`ImageSplit`."""
    arr = dataset.with_format("numpy")
    return ImageSplit(np.asarray(arr["image"][:], dtype=np.uint8), torch.as_tensor(arr["label"][:], dtype=torch.long),
                      int(image_size), int(num_channels), tuple(float(m) for m in mean), tuple(float(v) for v in std))


def cache_root() -> Path:
    return Path(os.environ.get("FEDBENCH_CACHE", Path.home() / ".cache" / "fedbench"))


def tokenize_split(dataset, tokenizer, max_length: int, cache_key: str | None = None) -> TokenizedSplit:
    """Tokenize a `datasets` split (columns text[, text_pair], label), cached on disk by content.

    The cache key covers the split's fingerprint (or `cache_key`), the tokenizer and max_length, so a
    change in any of them re-tokenizes.
    """
    fingerprint = cache_key or getattr(dataset, "_fingerprint", None)
    path = None
    if fingerprint:
        key = hashlib.sha256(f"{fingerprint}|{tokenizer.name_or_path}|{len(tokenizer)}|{max_length}".encode())
        path = cache_root() / "tokens" / f"{key.hexdigest()[:16]}.pt"
        if path.exists():
            blob = torch.load(path, weights_only=True)
            return TokenizedSplit(list(blob["ids"].split(blob["lengths"].tolist())), blob["labels"])
    texts = list(dataset["text"])
    pairs = list(dataset["text_pair"]) if "text_pair" in dataset.column_names else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
    ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]
    labels = torch.tensor(list(dataset["label"]), dtype=torch.long)
    if path is not None:
        from fedbench.results import atomic_write_bytes
        import io
        buf = io.BytesIO()
        torch.save({"ids": torch.cat(ids), "lengths": torch.tensor([len(t) for t in ids]), "labels": labels}, buf)
        atomic_write_bytes(path, buf.getvalue())
    return TokenizedSplit(ids, labels)


def pad_batch(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence of this batch only (dynamic padding)."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def pad_hidden(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad cached hidden states (len_i x hidden each) to one batch tensor and its mask."""
    longest = max(s.shape[0] for s in states)
    out = states[0].new_zeros((len(states), longest, states[0].shape[1]))
    mask = torch.zeros((len(states), longest), dtype=torch.long, device=out.device)
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return out, mask


def on_model_device(model, *tensors):
    """`tensors` (None kept) on the device of `model`'s parameters: a cache lives where its model computes."""
    device = next(model.parameters()).device
    return tuple(None if t is None else t.to(device) for t in tensors)


def batch_order(indices: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                shuffle: bool = True, bucketing: bool = True) -> list[np.ndarray]:
    """Split `indices` into batches.

    With bucketing, a shuffled epoch is cut into chunks of 50 batches, each chunk sorted by length
    before it is cut into batches, and the batch order shuffled again: batches hold examples of
    similar length (little padding) while the epoch stays random.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if shuffle:
        idx = rng.permutation(idx)
    if bucketing:
        chunk = batch_size * 50
        parts = []
        for start in range(0, len(idx), chunk):
            c = idx[start:start + chunk]
            parts.append(c[np.argsort(lengths[c], kind="stable")])
        idx = np.concatenate(parts) if parts else idx
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if shuffle and bucketing:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class ActivationCache:
    """Output of the frozen bottom `depth` layers per example, computed once and reused.

    With trainable parts only above layer `depth`, the bottom layers' output for an example never
    changes between rounds (their weights are frozen and they run without dropout), so a client
    computes it once. One cache per (model base, split); it is keyed by example index, so in a
    simulation the clients' caches are slices of this one (each client only touches its own rows).
    A change of depth switches to that depth's own store (:meth:`ensure`); one cache can so serve models
    of different depths over the same frozen backbone (e.g. several runs on the same data). A changed
    frozen base needs a new cache.
    """

    def __init__(self, split: "TokenizedSplit | ImageSplit", pad_id: int = 0):
        self.split, self.pad_id = split, pad_id
        self.depth: int | None = None
        self.hidden: dict[int, torch.Tensor] = {}
        self._stores: dict[int, dict[int, torch.Tensor]] = {}
        # the chunks computed, in order, per depth: a float computed in another batch can differ in its
        # last bits, so a resumed run replays this order to get bit-identical cached values
        self._log: dict[int, list[list[int]]] = {}

    def ensure(self, depth: int) -> None:
        if depth != self.depth:
            self.depth, self.hidden = depth, self._stores.setdefault(depth, {})

    def fill_log(self) -> dict[str, list[list[int]]]:
        """JSON-able: per depth, the example chunks in the order they were computed."""
        return {str(d): [list(c) for c in chunks] for d, chunks in self._log.items()}

    @torch.no_grad()
    def replay(self, model, fill_log: dict) -> None:
        """Recompute the chunks of `fill_log` in its order (chunks already present are skipped)."""
        depth = self.depth
        for d, chunks in fill_log.items():
            self.ensure(int(d))
            for chunk in chunks:
                if any(int(i) not in self.hidden for i in chunk):
                    self._compute(model, [int(i) for i in chunk])
        if depth is not None:
            self.ensure(depth)

    def _compute(self, model, chunk: list[int]) -> None:
        was_training = model.training
        model.eval()
        x, mask = on_model_device(model, *self.split.inputs(chunk, self.pad_id))
        self._store(self.hidden, self.depth, chunk, model.prefix_hidden(x, mask, self.depth), mask)
        model.train(was_training)

    def _store(self, store: dict, depth: int, chunk: list[int], h: torch.Tensor, mask) -> None:
        """Keep in `store` each example's unpadded rows of `h` (the prefix output of `chunk` at `depth`) not
        stored yet, and log the chunk under `depth` (the order :meth:`replay` recomputes)."""
        lengths = mask.sum(1).tolist() if mask is not None else [h.shape[1]] * len(chunk)
        for row, i in enumerate(chunk):
            if i not in store:
                store[i] = h[row, : int(lengths[row])].clone()
        self._log.setdefault(depth, []).append(list(chunk))

    def _fill_order(self, indices) -> np.ndarray:
        """`indices` by length, then index: the fixed order every fill computes in."""
        idx = np.asarray(indices)
        return idx[np.lexsort((idx, self.split.lengths[idx]))]

    @torch.no_grad()
    def get(self, model, indices: np.ndarray, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        todo = [int(i) for i in indices if int(i) not in self.hidden]
        for start in range(0, len(todo), batch_size):
            self._compute(model, todo[start:start + batch_size])
        return pad_hidden([self.hidden[int(i)] for i in indices])

    @torch.no_grad()
    def fill(self, model, indices, depth: int, batch_size: int = 128) -> None:
        """Compute the prefix of every example in `indices` at `depth`, in a fixed order (by length, then index):
        the cached values, and every number after them, then do not depend on which runs came first."""
        self.ensure(depth)
        order = self._fill_order(indices)
        for start in range(0, len(order), batch_size):
            self.get(model, order[start:start + batch_size], batch_size)

    @torch.no_grad()
    def fill_depths(self, model, indices, depths, batch_size: int = 128) -> None:
        """:meth:`fill` at every depth of `depths` in one pass per chunk: the prefix runs once up to the deepest
        and the shallower outputs are read on the way (the same operations on the same chunks as one
        :meth:`fill` per depth, so the same values; the shallow layers are not run again)."""
        depths = sorted({int(d) for d in depths})
        order = self._fill_order(indices)
        layers = model.layers
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), batch_size):
                chunk = [int(i) for i in order[start:start + batch_size]]
                todo = [d for d in depths if any(i not in self._stores.setdefault(d, {}) for i in chunk)]
                if not todo:
                    continue
                seen = {}
                handles = [layers[d - 1].register_forward_hook(
                    lambda mod, args, out, d=d: seen.__setitem__(d, out[0] if isinstance(out, tuple) else out))
                    for d in todo[:-1]]
                try:
                    x, mask = on_model_device(model, *self.split.inputs(chunk, self.pad_id))
                    seen[todo[-1]] = model.prefix_hidden(x, mask, todo[-1])
                finally:
                    for h in handles:
                        h.remove()
                for d in todo:
                    self._store(self._stores[d], d, chunk, seen[d], mask)
        finally:
            model.train(was_training)
        if self.depth is not None:
            self.hidden = self._stores.setdefault(self.depth, {})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self._stores.values() for t in store.values())
