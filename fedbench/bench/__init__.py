"""The bench layer between the loop and the experiments: what every experiment shares (the frozen-prefix caches
its runs share, its generated report)."""
from fedbench.bench.caches import PrefixCaches
from fedbench.bench.report import Headline, write_report

__all__ = ["Headline", "PrefixCaches", "write_report"]
