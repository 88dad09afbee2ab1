"""The bench layer between the loop and the experiments: what every experiment shares (its generated report)."""
from fedbench.bench.report import Headline, write_report

__all__ = ["Headline", "write_report"]
