"""DP-SGD on a client with Opacus: Poisson-sampled batches, per-sample clipping, Gaussian noise, and a
privacy ledger that follows the client across every round it takes part in.

:func:`train_client_dp` is what :func:`fedbench.fl.client.train_client` runs when ``cfg.dp.enabled``.
One local step, as in Abadi et al. (2016) and Opacus' ``DPDataLoader`` + ``DPOptimizer``:

1. every local example joins the batch independently with probability ``q = 1 / ceil(n / batch_size)``
   (Poisson sampling; Opacus' own choice of q for a data loader with that batch size), so the batch has
   ``q n <= batch_size`` examples on average and a random size;
2. per-sample gradients of the mean loss come from Opacus' hooks (:class:`opacus.GradSampleHooks`);
3. :class:`opacus.optimizers.DPOptimizer` clips each sample's gradient to L2 norm ``C = max_grad_norm``,
   sums, adds N(0, (sigma C)^2) noise from a seeded generator and divides by the expected batch size ``q n``;
   the wrapped optimizer (AdamW or SGD, from the TrainConfig) then steps. AdamW only post-processes the
   noisy gradient, so the privacy guarantee is the same as for SGD.

The accountant (``dp.accountant``: rdp, prv or gdp) composes every step of every round the client trained
in: its history lives in the ``dp_state`` dict that the round loop keeps per client, so
``dp_state["epsilon"]`` is the epsilon the client has spent so far, for ``delta`` (default ``1 / n``).

With ``dp.target_epsilon``, sigma is calibrated with :func:`opacus.accountants.utils.get_noise_multiplier`
so that a client that takes part in all ``total_rounds`` rounds of the run spends at most the target (a
client sampled less often spends less). ``total_rounds`` is the run's number of rounds: the loop passes
``cfg.fl.rounds``; a direct call without it calibrates for a single round.

Determinism: batch membership is drawn from a numpy generator and the noise from a ``torch.Generator``,
both seeded from the client's seed, with ``secure_mode=False``. That makes a run reproducible, which is
what a benchmark needs; a deployment would use ``secure_mode=True`` (a cryptographically secure, unseeded
generator, robust to floating-point attacks on the noise) and give up bit-exact reruns.

Opacus sees the plain shared model: the hooks are attached for this client only and removed (with every
attribute Opacus adds to parameters and modules) before the function returns, also on errors, so the next
client and the evaluation run on the unmodified model. Two model details make per-sample gradients exact:
a learned position-embedding table is looked up with a batch dimension while the hooks are on (BERT's
embedding layer broadcasts one row of position ids over the batch, which Opacus would read as a batch of
one), and the soft prompt is looked up per example (see :meth:`EncoderClassifier.embed`).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from fedbench.models import trainable_state

# Per-sample gradients need (examples x trainable parameters) floats; a logical Poisson batch is cut into
# physical chunks that keep that under this many bytes (full fine-tuning: a few examples at a time). The
# chunks are clipped and summed before the noise is added, so the step is the same as in one pass.
PHYSICAL_BATCH_BYTES = 512 * 2**20


def steps_per_round(cfg, n: int) -> int:
    """Local DP steps a client with `n` examples takes per round: `local_steps`, or the expected number of
    Poisson batches in `local_epochs` epochs."""
    if cfg.local_steps is not None:
        return int(cfg.local_steps)
    return int(cfg.local_epochs * math.ceil(n / cfg.batch_size))


def sample_rate(cfg, n: int) -> float:
    """Poisson sampling rate q = 1 / ceil(n / batch_size), as Opacus' DPDataLoader uses."""
    return 1.0 / math.ceil(n / cfg.batch_size)


def client_delta(dp_cfg, n: int) -> float:
    return float(dp_cfg.delta) if dp_cfg.delta is not None else 1.0 / n


def calibrate_noise(dp_cfg, q: float, steps: int, delta: float) -> float:
    """sigma for the run: given (`dp.noise_multiplier`), or the smallest one (Opacus' binary search,
    tolerance 0.01) for which `steps` steps at rate `q` spend at most `dp.target_epsilon` at `delta`."""
    if dp_cfg.noise_multiplier is not None:
        return float(dp_cfg.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier
    return float(get_noise_multiplier(target_epsilon=dp_cfg.target_epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant=dp_cfg.accountant))


def epsilon_of(accountant_name: str, history: list, delta: float) -> float:
    """Epsilon of an accountant history [(sigma, q, steps), ...] at `delta` (0 for an empty history)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant
    acc = create_accountant(mechanism=accountant_name)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def _position_ids_hook(embeddings):
    """Forward pre-hook: give BERT's embedding layer position ids with a batch dimension."""
    def hook(module, args, kwargs):
        if kwargs.get("position_ids") is not None:
            return None
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            ref = args[0]
        batch, length = ref.shape[0], ref.shape[1]
        kwargs = dict(kwargs)
        kwargs["position_ids"] = module.position_ids[:, :length].expand(batch, length)
        return args, kwargs
    return embeddings.register_forward_pre_hook(hook, with_kwargs=True)


def _cleanup(model, hooks, extra_handles) -> None:
    """Remove every hook and attribute Opacus (or this module) put on the model."""
    if hooks is not None:
        hooks.cleanup()
    for h in extra_handles:
        h.remove()
    for p in model.parameters():
        for attr in ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad",
                     "_processed"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    for m in model.modules():
        for attr in ("activations", "max_batch_len"):
            if hasattr(m, attr):
                delattr(m, attr)


@contextmanager
def per_sample_hooks(model):
    """Opacus' per-sample-gradient hooks on `model` for the duration of the block, then removed with every
    attribute they (and the DP optimizer) put on parameters and modules."""
    from opacus.grad_sample import GradSampleHooks
    hooks, handles = None, []
    try:
        emb = model.encoder.embeddings
        if getattr(emb, "position_embeddings", None) is not None and emb.position_embeddings.weight.requires_grad:
            handles.append(_position_ids_hook(emb))
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
        yield hooks
    finally:
        _cleanup(model, hooks, handles)


def per_sample_gradients(model, split, batch, pad_id: int = 0, cache=None) -> dict[str, torch.Tensor]:
    """{name: (len(batch), *shape)} gradients of each example's own loss, from Opacus' hooks on one padded
    batch (what DP-SGD clips). A diagnostic, and what the tests check against one-example autograd."""
    from fedbench.fl.client import forward_batch
    batch = np.asarray(batch)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    with per_sample_hooks(model):
        model.train()
        logits = forward_batch(model, split, batch, cache, pad_id)
        F.cross_entropy(logits, split.labels[batch]).backward()
        out = {k: p.grad_sample.detach().clone() for k, p in named}
    model.eval()
    return out


def physical_chunks(batch: np.ndarray, trainable: int) -> list[np.ndarray]:
    size = max(1, int(PHYSICAL_BATCH_BYTES // (4 * max(1, trainable))))
    return [batch[i:i + size] for i in range(0, len(batch), size)] or [batch]


def train_client_dp(model, state_in: dict, split, indices, cfg, seed: int, client_id: int = 0, pad_id: int = 0,
                    dp_state: dict | None = None, start: float | None = None, *, total_rounds: int = 1,
                    cache=None):
    """DP-SGD local training of one client (see the module docstring); returns a ClientUpdate whose
    ``metrics`` carry ``dp_epsilon`` (this client's total so far), ``dp_noise_multiplier``, ``dp_delta``,
    ``dp_sample_rate``. `dp_state` (the client's ledger, updated in place) keeps the accountant history."""
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer

    from fedbench.config import ConfigError
    from fedbench.fl.client import ClientUpdate, forward_batch, make_optimizer

    start = time.perf_counter() if start is None else start
    dp = cfg.dp
    dp_state = {} if dp_state is None else dp_state
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if n == 0:
        raise ConfigError("data.num_clients", client_id, "clients that hold at least one example for DP-SGD")
    if not isinstance(total_rounds, int) or total_rounds < 1:
        raise ConfigError("fl.rounds", total_rounds, "an integer >= 1 (rounds the DP budget is spread over)")
    q = sample_rate(cfg, n)
    steps = steps_per_round(cfg, n)
    delta = client_delta(dp, n)
    calib_key = (dp.target_epsilon, dp.noise_multiplier, dp.accountant, q, steps, total_rounds, delta)
    if dp_state.get("calibration") != calib_key:
        dp_state["calibration"] = calib_key
        dp_state["noise_multiplier"] = calibrate_noise(dp, q, steps * total_rounds, delta)
    sigma = dp_state["noise_multiplier"]

    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    seeds = np.random.SeedSequence([int(seed), 0x5D9]).generate_state(2, dtype=np.uint32)
    rng = np.random.default_rng(int(seeds[0]))                        # Poisson batch membership
    noise_gen = torch.Generator().manual_seed(int(seeds[1]))          # Gaussian noise
    accountant = create_accountant(mechanism=dp.accountant)
    accountant.history = [tuple(h) for h in dp_state.get("history", [])]

    losses, sizes = [], []
    try:
        with per_sample_hooks(model):
            optimizer = DPOptimizer(make_optimizer(params, cfg), noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm,
                                    expected_batch_size=q * n, loss_reduction="mean", generator=noise_gen,
                                    secure_mode=False)
            if anchor is not None:   # FedProx: the proximal gradient is data-independent, added after the noise
                def prox(opt):
                    for p, a in zip(params, anchor):
                        p.grad.add_(p.detach() - a, alpha=cfg.prox_mu)
                optimizer.attach_step_hook(prox)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)          # dropout masks
                model.train()
                for _ in range(steps):
                    batch = indices[rng.random(n) < q]
                    optimizer.zero_grad(set_to_none=True)
                    if len(batch) == 0:          # an empty Poisson batch still releases noise
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    else:
                        chunks = physical_chunks(batch, trainable)
                        batch_loss = 0.0
                        for j, chunk in enumerate(chunks):
                            logits = forward_batch(model, split, chunk, cache, pad_id)
                            loss = F.cross_entropy(logits, split.labels[chunk])
                            loss.backward()
                            batch_loss += loss.item() * len(chunk)
                            if j < len(chunks) - 1:   # clip + accumulate this chunk, no noise yet
                                optimizer.signal_skip_step(do_skip=True)
                                optimizer.step()
                                optimizer.zero_grad(set_to_none=True)
                        losses.append(batch_loss / len(batch))
                    sizes.append(len(batch))
                    optimizer.step()
                    accountant.step(noise_multiplier=sigma, sample_rate=q)
                optimizer.zero_grad(set_to_none=True)
    finally:
        model.eval()
    history = [tuple(h) for h in accountant.history]
    epsilon = float(accountant.get_epsilon(delta=delta))
    dp_state.update(history=history, epsilon=epsilon, delta=delta, rounds=dp_state.get("rounds", 0) + 1,
                    steps=dp_state.get("steps", 0) + steps)
    return ClientUpdate(
        client_id=client_id, state=trainable_state(model), num_samples=n, num_steps=steps,
        train_loss=float(np.mean(losses)) if losses else float("nan"), wall_s=time.perf_counter() - start,
        metrics={"dp_epsilon": epsilon, "dp_noise_multiplier": sigma, "dp_delta": delta, "dp_sample_rate": q,
                 "dp_mean_batch": float(np.mean(sizes)) if sizes else 0.0})
