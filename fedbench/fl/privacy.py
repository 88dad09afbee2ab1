"""DP-SGD on a client with Opacus: Poisson-sampled batches, per-sample clipping, Gaussian noise, and a
privacy ledger that follows the client across every round it takes part in.

:func:`train_client_dp` is what :func:`fedbench.fl.client.train_client` runs when ``cfg.dp.enabled``.
One local step, as in Abadi et al. (2016) and Opacus' ``DPDataLoader`` + ``DPOptimizer``:

1. every local example joins the batch independently with probability ``q = 1 / ceil(n / batch_size)``
   (Poisson sampling, with the q Opacus' DPDataLoader uses for that batch size), so the batch holds
   ``q n <= batch_size`` examples on average and has a random size (padded to its own longest example);
2. each example's gradient of its own loss is clipped to L2 norm ``C = dp.max_grad_norm`` and the clipped
   gradients are summed, by one of two Opacus mechanisms that compute the same sum:
   - ``"hooks"``: per-sample gradients materialised by :class:`opacus.grad_sample.GradSampleHooks` and
     clipped by :class:`opacus.optimizers.DPOptimizer` (cheap when few parameters train);
   - ``"ghost"``: Opacus' ghost clipping (``GradSampleHooksFastGradientClipping`` +
     ``DPLossFastGradientClipping``): per-sample gradient *norms* from activations and backprops, then a
     second backward pass of the clip-weighted loss. Used when materialising (batch x trainable) gradients
     would be large: full fine-tuning (22.7 M parameters; its word-embedding table alone is 47 MB per
     example as a dense per-sample gradient);
3. N(0, (sigma C)^2) noise from a seeded generator is added to the sum, which is divided by the expected
   batch size ``q n``; the wrapped optimizer (AdamW or SGD, from the TrainConfig) steps on that. Whatever
   the optimizer does with the noisy gradient is post-processing: the guarantee is the one of DP-SGD.

The accountant (``dp.accountant``: rdp, prv or gdp) composes every step of every round the client trained
in: its history lives in the ``dp_state`` dict that the round loop keeps per client, so
``dp_state["epsilon"]`` is the epsilon the client has spent so far, for ``delta`` (default ``1 / n``, which
is weak: :func:`client_delta` warns when delta >= 1/n).

``dp.noise_multiplier = 0`` is the clipping-only control: per-sample clipping and the same optimizer, no
noise; its epsilon is infinite. It separates what clipping costs from what the noise costs.

With ``dp.target_epsilon``, sigma is calibrated with :func:`opacus.accountants.utils.get_noise_multiplier`
so that a client that takes part in all ``total_rounds`` rounds of the run spends at most the target (a
client sampled less often spends less). ``total_rounds`` is the run's number of rounds: the round loop
passes ``cfg.fl.rounds``; a direct call without it calibrates for a single round.

Determinism: batch membership is drawn from a numpy generator and the noise from a ``torch.Generator``,
both seeded from the client's seed, with ``secure_mode=False``. That makes a run reproducible, which a
benchmark needs; a deployment would use ``secure_mode=True`` (noise robust to floating-point attacks from a
cryptographically secure generator) and give up bit-exact reruns.

Opacus sees the plain shared model: its hooks are attached for this client only and removed, with every
attribute Opacus puts on parameters and modules, before the function returns (also on errors), so the next
client and the evaluation run on the unmodified model. Two model details make per-sample gradients exact:
position and token-type ids get a batch dimension while the hooks are on (BERT's
embedding layer broadcasts one row of position ids over the batch, which Opacus would read as a batch of
one), and the soft prompt is looked up per example (see :meth:`EncoderClassifier.embed`).
Plain gradient clipping (``train.max_grad_norm``) is not applied on top of DP-SGD's per-sample clipping.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from fedbench.models import trainable_state

CLIPPING_MODES = ("auto", "hooks", "ghost")
# "auto" uses ghost clipping when the materialised per-sample gradients of a batch of `batch_size` examples
# would take more than this many bytes. Measured (2 CPU cores, Opacus 1.6): full fine-tuning of MiniLM's top
# layer (1.78M parameters, batches of 16 x 32 tokens, 10 rounds x 3 clients x 4 steps) takes 15.4 s with
# ghost clipping and 20.9 s with materialised per-sample gradients (108 MiB a batch), so the line sits below
# that; every PEFT method (at most 19 MiB a batch of 32 with adapters on all six layers) stays on hooks.
GHOST_CLIPPING_ABOVE_BYTES = 64 * 2**20


def steps_per_round(cfg, n: int) -> int:
    """Local DP steps a client with `n` examples takes per round: `local_steps`, or the expected number of
    Poisson batches in `local_epochs` epochs."""
    if cfg.local_steps is not None:
        return int(cfg.local_steps)
    return int(cfg.local_epochs * math.ceil(n / cfg.batch_size))


def sample_rate(cfg, n: int) -> float:
    """Poisson sampling rate q = 1 / ceil(n / batch_size), as Opacus' DPDataLoader uses."""
    return 1.0 / math.ceil(n / cfg.batch_size)


class WeakDeltaWarning(UserWarning):
    """delta >= 1/n for a client of n examples: a mechanism that publishes one record in the clear meets
    (0, 1/n)-DP, so such a delta guarantees little whatever epsilon is."""


def client_delta(dp_cfg, n: int) -> float:
    """The client's delta: ``dp.delta``, or 1/n when it is None; warns (:class:`WeakDeltaWarning`) when
    delta >= 1/n (the None default included)."""
    delta = float(dp_cfg.delta) if dp_cfg.delta is not None else 1.0 / n
    if delta * n >= 1.0:
        # the text depends on the config only, not on the client: Python shows a warning once per text and
        # place, so a run says it once instead of once per client (inside the progress bar)
        what = ("train.dp.delta is not set, so each client uses delta = 1/n (n = its number of examples)"
                if dp_cfg.delta is None else
                f"train.dp.delta={delta:.3g} is >= 1/n for every client with n <= {math.floor(1 / delta)} examples")
        warnings.warn(f"{what}: a mechanism that publishes one record in the clear meets (0, 1/n)-DP; set "
                      "train.dp.delta well below 1/n (e.g. 1e-5)", WeakDeltaWarning, stacklevel=2)
    return delta


def calibrate_noise(dp_cfg, q: float, steps: int, delta: float) -> float:
    """sigma for the run: given (`dp.noise_multiplier`), or calibrated so that `steps` steps at rate `q`
    spend at most `dp.target_epsilon` at `delta`, by the criterion of Opacus' ``get_noise_multiplier``
    (epsilon within 0.01 below the target, never above). For the RDP accountant the same criterion is met
    by :func:`calibrate_rdp` with 3-6 accountant evaluations instead of ~18 (see there); the other
    accountants use ``get_noise_multiplier`` itself."""
    if dp_cfg.noise_multiplier is not None:
        return float(dp_cfg.noise_multiplier)
    if dp_cfg.accountant == "rdp":
        return calibrate_rdp(float(dp_cfg.target_epsilon), float(delta), float(q), int(steps))
    from opacus.accountants.utils import get_noise_multiplier
    return float(get_noise_multiplier(target_epsilon=dp_cfg.target_epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant=dp_cfg.accountant))


@lru_cache(maxsize=16384)
def _rdp_one_step(q: float, sigma: float) -> np.ndarray:
    """RDP of one sampled-Gaussian step at Opacus' default orders (memoised: it is the slow part)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis
    return analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


def epsilon_of(accountant_name: str, history: list, delta: float) -> float:
    """Epsilon of an Opacus accountant history [(sigma, q, steps), ...] at `delta` (0 if empty).

    For "rdp" this is RDPAccountant.get_epsilon computed term by term as Opacus does (``compute_rdp`` is
    linear in steps), with the per-step RDP curve memoised; other accountants are asked directly."""
    if not history:
        return 0.0
    if any(float(sigma) == 0 and steps > 0 for sigma, _, steps in history):
        return math.inf              # a step without noise (clipping only) has no finite epsilon
    from opacus.accountants import RDPAccountant, create_accountant
    if accountant_name == "rdp":
        from opacus.accountants.analysis import rdp as analysis
        rdp = sum([_rdp_one_step(float(q), float(sigma)) * steps for sigma, q, steps in history])
        eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant_name)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=4096)
def calibrate_rdp(target_epsilon: float, delta: float, q: float, steps: int, tolerance: float = 0.01) -> float:
    """The noise multiplier whose RDP epsilon after `steps` steps at rate `q` lies in
    [target - tolerance, target] (Opacus' get_noise_multiplier criterion, whose answer is also a sigma
    with epsilon in that interval). Epsilon falls smoothly and monotonically in sigma and is close to a
    power law, so a bracketing secant search in log-log space (regula falsi, Illinois variant, bisection
    as a fallback) needs a handful of accountant evaluations."""
    def eps(sigma):
        return epsilon_of("rdp", [(sigma, q, steps)], delta)

    lo, e_lo = None, None          # sigma with eps > target
    hi, e_hi = None, None          # sigma with eps <= target
    sigma = 1.0
    for _ in range(60):            # bracket by doubling / halving
        e = eps(sigma)
        if e > target_epsilon:
            lo, e_lo = sigma, e
            if hi is not None:
                break
            sigma *= 2.0
        else:
            hi, e_hi = sigma, e
            if lo is not None:
                break
            sigma /= 2.0
    if hi is None or lo is None:
        raise ValueError(f"cannot calibrate sigma for epsilon={target_epsilon}, delta={delta}, q={q}, steps={steps}")

    def f(e):                      # log(eps / target): > 0 above the target, <= 0 at or below it
        return math.log(e / target_epsilon) if math.isfinite(e) else math.inf

    f_lo, f_hi, last = f(e_lo), f(e_hi), None
    for _ in range(200):
        if target_epsilon - e_hi <= tolerance:
            return float(hi)
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo) if math.isfinite(f_lo) else (x_lo + x_hi) / 2
        if not x_lo < x < x_hi:
            x = (x_lo + x_hi) / 2
        sigma = math.exp(x)
        e = eps(sigma)
        if e > target_epsilon:
            lo, e_lo, f_lo = sigma, e, f(e)
            if last == "lo":       # Illinois: the other end is stale, halve its weight
                f_hi /= 2
            last = "lo"
        else:
            hi, e_hi, f_hi = sigma, e, f(e)
            if last == "hi":
                f_lo /= 2
            last = "hi"
    raise ValueError(f"sigma calibration did not converge for epsilon={target_epsilon}")


def clipping_mode(model, batch_size: float, requested: str = "auto") -> str:
    """The per-sample clipping mechanism for `model`: `requested`, or for "auto" ghost clipping when the
    materialised per-sample gradients of a batch of `batch_size` would exceed GHOST_CLIPPING_ABOVE_BYTES."""
    if requested not in CLIPPING_MODES:
        from fedbench.config import ConfigError
        raise ConfigError("clipping", requested, f"one of {list(CLIPPING_MODES)}")
    if requested != "auto":
        return requested
    return auto_clipping_mode(sum(p.numel() for p in model.parameters() if p.requires_grad), batch_size)


def auto_clipping_mode(trainable: int, batch_size: float) -> str:
    return "ghost" if 4 * trainable * max(1.0, batch_size) > GHOST_CLIPPING_ABOVE_BYTES else "hooks"


def _batched_ids_hook(embeddings):
    """Forward pre-hook: give BERT's embedding layer position (and token type) ids as contiguous
    (batch x length) tensors, the values it would broadcast itself, so every lookup has a batch dimension."""
    def hook(module, args, kwargs):
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            ref = args[0]
        batch, length = ref.shape[0], ref.shape[1]
        kwargs = dict(kwargs)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = module.position_ids[:, :length].repeat(batch, 1)
        if kwargs.get("token_type_ids") is None and hasattr(module, "token_type_ids"):
            kwargs["token_type_ids"] = module.token_type_ids[:, :length].repeat(batch, 1)
        return args, kwargs
    return embeddings.register_forward_pre_hook(hook, with_kwargs=True)


_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len")


def _cleanup(model, hooks, extra_handles) -> None:
    """Remove every hook and attribute Opacus (or this module) put on the model."""
    if hooks is not None:
        hooks.cleanup()
    for h in extra_handles:
        h.remove()
    for p in model.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    for m in model.modules():
        for attr in _MODULE_ATTRS:
            if hasattr(m, attr):
                delattr(m, attr)


@contextmanager
def per_sample_hooks(model, mode: str = "hooks", max_grad_norm: float = 1.0):
    """Opacus' per-sample hooks on `model` for the duration of the block ("hooks": per-sample gradients;
    "ghost": per-sample gradient norms for ghost clipping), then removed with every attribute they and
    the DP optimizer put on parameters and modules."""
    from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
    hooks, handles = None, []
    try:
        emb = model.encoder.embeddings
        if any(p.requires_grad for p in emb.parameters()):
            handles.append(_batched_ids_hook(emb))
        if mode == "ghost":
            hooks = GradSampleHooksFastGradientClipping(model, batch_first=True, loss_reduction="mean", strict=True,
                                                        max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        else:
            hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
        with warnings.catch_warnings():
            # the head's input (cached frozen features) needs no gradient: torch says so once per backward
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
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
        F.cross_entropy(logits, split.labels[batch].to(logits.device)).backward()
        out = {k: p.grad_sample.detach().clone() for k, p in named}
    model.eval()
    return out


def train_client_dp(model, state_in: dict, split, indices, cfg, seed: int, client_id: int = 0, pad_id: int = 0,
                    dp_state: dict | None = None, start: float | None = None, *, total_rounds: int = 1,
                    cache=None, clipping: str = "auto"):
    """DP-SGD local training of one client (see the module docstring).

    Returns a ClientUpdate whose ``metrics`` carry ``dp_epsilon`` (this client's total over every round it
    trained in so far), ``dp_noise_multiplier``, ``dp_delta``, ``dp_sample_rate``, ``dp_clipping``.
    `dp_state` (the client's ledger, updated in place) keeps ``history`` (the accountant's), ``epsilon``,
    ``delta``, ``noise_multiplier``, ``rounds`` and ``steps``. `clipping` picks the mechanism ("auto":
    ghost clipping for large trainable sets, else materialised per-sample gradients).
    """
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from fedbench.config import ConfigError
    from fedbench.fl.client import ClientUpdate, forward_batch, make_optimizer

    start = time.perf_counter() if start is None else start
    dp = cfg.dp
    dp_state = {} if dp_state is None else dp_state
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if n == 0:
        raise ConfigError("data.num_clients", client_id, "clients that each hold at least one example (DP-SGD)")
    if not isinstance(total_rounds, int) or isinstance(total_rounds, bool) or total_rounds < 1:
        raise ConfigError("fl.rounds", total_rounds, "an integer >= 1 (the rounds a DP budget is spread over)")
    q = sample_rate(cfg, n)
    steps = steps_per_round(cfg, n)
    delta = client_delta(dp, n)
    calibration = (dp.target_epsilon, dp.noise_multiplier, dp.accountant, q, steps, total_rounds, delta)
    # (a ledger restored from JSON holds lists where it was written with tuples)
    if tuple(dp_state.get("calibration") or ()) != calibration:
        dp_state["calibration"] = calibration
        dp_state["noise_multiplier"] = calibrate_noise(dp, q, steps * total_rounds, delta)
    sigma = dp_state["noise_multiplier"]
    mode = clipping_mode(model, cfg.batch_size, clipping)   # per run, not per client: the same for all

    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    seeds = np.random.SeedSequence([int(seed), 0x5D9]).generate_state(2, dtype=np.uint32)
    rng = np.random.default_rng(int(seeds[0]))                        # Poisson batch membership
    # Gaussian noise, drawn where the gradients are (Opacus draws on the parameters' device; a CUDA stream of
    # the same seed is a different sequence, so DP noise is not bit-identical across devices)
    noise_gen = torch.Generator(device=params[0].device if params else "cpu").manual_seed(int(seeds[1]))
    accountant = create_accountant(mechanism=dp.accountant)
    accountant.history = [tuple(h) for h in dp_state.get("history", [])]

    losses, sizes = [], []
    try:
        with per_sample_hooks(model, mode, dp.max_grad_norm) as hooks:
            opt_cls = DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer
            optimizer = opt_cls(make_optimizer(params, cfg), noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm,
                                expected_batch_size=q * n, loss_reduction="mean", generator=noise_gen,
                                secure_mode=False)
            criterion = (DPLossFastGradientClipping(hooks, optimizer, torch.nn.CrossEntropyLoss(), "mean")
                         if mode == "ghost" else F.cross_entropy)
            if anchor is not None:   # FedProx: the proximal gradient is data-independent, added after the noise
                def prox(_opt):
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
                            if mode == "ghost":
                                p.grad = torch.zeros_like(p)
                            else:
                                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    else:
                        logits = forward_batch(model, split, batch, cache, pad_id)
                        loss = criterion(logits, split.labels[batch].to(logits.device))
                        loss.backward()
                        losses.append(float(loss.item()))
                    sizes.append(len(batch))
                    optimizer.step()
                    accountant.step(noise_multiplier=sigma, sample_rate=q)
                optimizer.zero_grad(set_to_none=True)
    finally:
        model.eval()
    history = [tuple(h) for h in accountant.history]
    epsilon = epsilon_of(dp.accountant, history, delta)     # = accountant.get_epsilon(delta), memoised
    dp_state.update(history=history, epsilon=epsilon, delta=delta, rounds=dp_state.get("rounds", 0) + 1,
                    steps=dp_state.get("steps", 0) + steps)
    return ClientUpdate(
        client_id=client_id, state=trainable_state(model), num_samples=n, num_steps=steps,
        train_loss=float(np.mean(losses)) if losses else float("nan"), wall_s=time.perf_counter() - start,
        metrics={"dp_epsilon": epsilon, "dp_noise_multiplier": sigma, "dp_delta": delta, "dp_sample_rate": q,
                 "dp_clipping": mode, "dp_mean_batch": float(np.mean(sizes)) if sizes else 0.0})
