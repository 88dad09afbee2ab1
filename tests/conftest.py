import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture()
def tmp_results(tmp_path, monkeypatch):
    """Send every result write of a test to a temporary folder."""
    monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / "results"))
    monkeypatch.delenv("FEDBENCH_RESULTS", raising=False)
    return tmp_path / "results"
