import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# tests/plugins holds an outside plugin package (fedbench_extra): importable like any installed module
PLUGINS_DIR = str(Path(__file__).parent / "plugins")
if PLUGINS_DIR not in sys.path:
    sys.path.insert(0, PLUGINS_DIR)


@pytest.fixture()
def tmp_results(tmp_path, monkeypatch):
    """Send every result write of a test to a temporary folder."""
    monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / "results"))
    monkeypatch.delenv("FEDBENCH_RESULTS", raising=False)
    return tmp_path / "results"
