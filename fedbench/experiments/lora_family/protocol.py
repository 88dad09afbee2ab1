"""The protocol table of the federated-LoRA family, one row per method: the paper, the reference code read, and
what fedbench runs (where the paper and its reference code disagree, the paper). Reading notes, not runs: no
measured number belongs here (those are the report's tables)."""
from __future__ import annotations

TITLE = "# The federated-LoRA family: protocol (paper / reference code / ours)"
COLUMNS = ("method", "paper", "reference code", "ours")
ROWS = (
    ("FedSA-LoRA", "A averaged, B local (2410.01463)",
     "Pengxin-Guo/FedSA-LoRA; FedLLM-Factory `alg/fedsalora.py`: only lora_A uploaded",
     ("`fedsa`: A + head averaged (zero-padded across tiers), B in the client store at its rank; personalised "
      "evaluation")),
    ("FedEx-LoRA", "residual mean(B_i A_i) - mean(B) mean(A) added to W0, with the LoRA scaling (2410.09432)",
     "FedLLM-Factory `alg/fedexlora.py`: weighted product mean minus *unweighted* factor means, no scaling",
     ("`fedex_lora`: paper: both means sample-weighted, times the scaling; the dense residual counted down each "
      "round")),
    ("FlexLoRA", "weighted mean of full products, SVD, truncation to each client's rank (2402.11505)",
     "none read (not in FedLLM-Factory)",
     "`flexlora`: the rule over dense products, SVD (B = U S, A = V^T), per-client truncation"),
    ("HetLoRA", ("truncation; self-pruning with lambda on the rank tail; sparsity (||B_k A_k||_F) weighted "
                 "zero-padded mean (2401.06432)"), "none public",
     "`hetlora`: as the paper describes (reg, gamma options); refuses DP (a loss term)"),
    ("RoLoRA", "alternate B / A (2502.01755; within a round)",
     "FedLLM-Factory `alg/rolora.py`: one factor per round, B on odd rounds",
     "`rolora`: one factor per round, B first (the issue's across-rounds schedule, shared with LoRM)"),
    ("FedSVD", "B trained, B A re-factorised by SVD: A = V_r^T, B = U_r S_r (2505.12805)",
     "seanie12/fed-svd (periodic re-init); FedLLM-Factory `alg/fedsvd.py` takes rows of V, not of V^T",
     "`fedsvd`: the paper's V_r^T, every `period` rounds"),
    ("rank tiers", "-", "-",
     ("`fl.options.ranks` (seeded balanced tiers); clients train zero-padded at their rank, bytes counted at it; "
      "scaling alpha / peft.rank for all")),
)


def protocol_table(rows=ROWS, columns=COLUMNS) -> str:
    """The rows as a markdown table (cells as written: they hold markdown)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


PROTOCOL = protocol_table()


def protocol_markdown() -> str:
    """PROTOCOL.md: the title and the table."""
    return f"{TITLE}\n\n{PROTOCOL}"
