"""The `paper` profiles (configs/<exp>/paper.yaml: the paper's backbone, data and schedule through the hub loaders)
checked offline: each resolves and validates, and one tiny round of it runs end to end on local stand-ins in the
hub's own schema (a tiny random BERT / ViT saved to disk for the backbone, a few rows per split for the data).
Only the download is replaced (fedbench.data.hub._load_from_hub); the mapping to fedbench's schema, the
federations, the strategies and the loop are the real ones. Without the stand-ins a paper profile fails offline
with a message naming what it needs."""
import json

import datasets
import numpy as np
import pytest
import torch

import fedbench.data.hub as hub
from fedbench.config import PROFILES
from fedbench.errors import ConfigError
from fedbench.bench import check_profile, profile_path, read_profile_file

PAPER = {"fedpeft": "google/vit-base-patch16-224-in21k", "lorm": "google/vit-base-patch16-224-in21k",
         "fl_tac": "google-bert/bert-base-uncased", "autofednlp": "google-bert/bert-base-uncased"}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel
    path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8, num_channels=3), add_pooling_layer=False).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT with bert-base-uncased's WordPiece vocabulary (the bundled MiniLM's tokenizer is it)."""
    from transformers import BertConfig, BertModel

    from fedbench.models import load_tokenizer
    path = tmp_path_factory.mktemp("tiny-bert")
    tok = load_tokenizer("minilm")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512), add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


WORDS = "the a movie plot question answer stock market team game science space good bad film".split()


def _text(rng, n_words=8):
    return " ".join(rng.choice(WORDS, size=n_words))


def _hub_rows(spec, n: int, seed: int) -> datasets.Dataset:
    """`n` rows in the hub's schema for `spec` (its own column names; CIFAR images as PIL-encodable arrays)."""
    rng = np.random.default_rng(seed)
    k = len(spec.class_names)
    labels = np.arange(n) % k                     # every class present (LoRM's sequence needs each one)
    cols = {c: [_text(rng) for _ in range(n)] for c in spec.text_columns}
    if spec.image_column:
        cols[spec.image_column] = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(n)]
        features = datasets.Features({spec.image_column: datasets.Image(),
                                      spec.label_column: datasets.Value("int64"),
                                      **({"coarse_label": datasets.Value("int64")} if spec.label_column == "fine_label"
                                         else {})})
        if spec.label_column == "fine_label":
            cols["coarse_label"] = list(labels // 5)
    else:
        features = None
    cols[spec.label_column] = list(labels)
    return datasets.Dataset.from_dict(cols, features=features)


@pytest.fixture
def hub_stand_ins(monkeypatch, tmp_path):
    """Every hub task answered by a few local rows in its hub schema (GLUE's hidden test labels as -1, as the hub
    stores them); the tokenization cache in tmp."""
    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "cache"))
    sizes = {"cifar100": (400, 100)}

    def fake(spec, cache_dir):
        n_train, n_test = sizes.get(spec.name, (60, 16))
        raw = {"train": _hub_rows(spec, n_train, 0), spec.test_split: _hub_rows(spec, n_test, 1)}
        if spec.test_split == "validation":
            hidden = _hub_rows(spec, 4, 2)
            raw["test"] = hidden.map(lambda b: {"label": [-1] * len(b["label"])}, batched=True)
        return datasets.DatasetDict(raw)
    hub._load_hub_cached.cache_clear()
    monkeypatch.setattr(hub, "_load_from_hub", fake)
    yield
    hub._load_hub_cached.cache_clear()
    from fedbench.fl import federations
    federations._POOLS.clear()


def _one_round_ran(result, rounds: int = 1):
    df = result.rounds
    acc = df["accuracy"].dropna() if "accuracy" in df else []
    assert list(df["round"]) == list(range(1, rounds + 1)) and len(acc) and acc.between(0, 1).all(), df


def test_paper_is_a_profile_everywhere_but_reproduce():
    assert "paper" in PROFILES and check_profile("paper") == "paper"
    with pytest.raises(ConfigError, match="profile"):
        check_profile("papers")
    for exp, backbone in PAPER.items():
        d = read_profile_file(profile_path(exp, "paper"))
        assert d["experiment"] == exp and d["profile"] == "paper" and d["base"]["model"]["backbone"] == backbone
    import re
    from pathlib import Path
    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert re.search(r"^PROFILE \?= quick$", make, re.M)        # make reproduce stays quick unless asked


@pytest.mark.parametrize("exp", sorted(PAPER))
def test_a_paper_profile_offline_names_the_backbone_it_needs(exp):
    import importlib
    module = importlib.import_module(f"fedbench.experiments.{exp}")
    with pytest.raises(ConfigError) as e:           # before any work: the backbone is checked first
        module.settings_for("paper")
    assert e.value.field_name == "model.backbone" and PAPER[exp] in str(e.value)


def test_a_hub_task_offline_names_what_to_do_instead(monkeypatch):
    from fedbench.data import TaskUnavailableError, load_task

    def offline(*args, **kwargs):
        raise ConnectionError("offline")
    hub._load_hub_cached.cache_clear()
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskUnavailableError, match=r"ag_news.*fancyzhx/ag_news.*offline task"):
        load_task("ag_news")
    hub._load_hub_cached.cache_clear()


def test_ag_news_maps_to_the_schema(hub_stand_ins):
    from fedbench.data import load_task
    ds = load_task("ag_news")
    assert ds["train"].column_names == ["text", "label"] and len(ds["test"]) == 16
    assert ds["train"].features["label"].names == ["World", "Sports", "Business", "Sci/Tech"]


def test_fl_tac_paper_runs_one_round_on_glue_stand_ins(hub_stand_ins, bert_dir):
    from fedbench.experiments import fl_tac
    from fedbench.fl.server import run_federated
    cfg = fl_tac.export("paper", lr=5e-4, **{"model.backbone": bert_dir, "max_train_per_task": 40, "val_per_task": 4,
                                              "max_test_per_task": 8, "train.local_steps": 2, "train.batch_size": 4,
                                              "fl.rounds": 1, "data.max_length": 16})
    assert tuple(cfg.data.federation_options["tasks"]) == ("glue/sst2", "glue/mrpc", "glue/qqp", "glue/qnli", "glue/rte")
    assert (cfg.peft.rank, cfg.peft.lora_dropout, cfg.train.lr) == (4, 0.05, 5e-4)
    _one_round_ran(run_federated(cfg))


def test_lorm_paper_runs_on_cifar100_stand_ins_on_a_vit(hub_stand_ins, vit_dir):
    from fedbench.experiments import lorm
    from fedbench.fl.server import run_federated
    cfg = lorm.export("paper", lr=3e-4, **{"model.backbone": vit_dir, "num_tasks": 2, "rounds_per_task": 1,
                                            "max_train_per_class": 4, "max_test_per_class": 1, "val_fraction": 0.25,
                                            "data.num_clients": 3, "train.local_epochs": 1, "train.batch_size": 8})
    assert cfg.data.task == "cifar100" and cfg.data.federation == "task_sequence" and cfg.peft.rank == 16
    _one_round_ran(run_federated(cfg), rounds=2)       # one round of each of the two tasks


def test_autofednlp_paper_runs_one_round_on_ag_news_stand_ins(hub_stand_ins, bert_dir):
    from fedbench.experiments import autofednlp
    from fedbench.fl.server import run_federated
    cfg = autofednlp.export("paper", method="autofednlp", lr=5e-3, **{
        "model.backbone": bert_dir, "rounds": 1, "validation_samples": 4, "data.num_clients": 4,
        "fl.clients_per_round": 2, "data.max_train_samples": 40, "data.max_test_samples": 8, "data.max_length": 16,
        "train.batch_size": 4})
    assert cfg.data.task == "ag_news" and cfg.fl.strategy == "autofednlp" and cfg.fl.rounds == 1
    _one_round_ran(run_federated(cfg))


@pytest.mark.parametrize("dp", [None, 8.0])
def test_fedpeft_paper_runs_one_round_on_cifar100_stand_ins_on_a_vit(hub_stand_ins, vit_dir, dp):
    from fedbench.experiments import fedpeft
    from fedbench.fl.server import run_federated
    s = fedpeft.settings_for("paper", **{"model.backbone": vit_dir, "clients": 4, "rounds": 1, "max_train_samples": 40,
                                         "max_test_samples": 20, "batch_size": 8, "train.local_steps": 2,
                                         "validation_samples": 10})
    assert list(s["tasks"]) == ["cifar100"] and 8.0 in s["dp_epsilons"]
    cell = fedpeft.base_cell(s, "cifar100", "lora", 0, dp_epsilon=dp)
    cfg = fedpeft.make_config(cell, s, lr=1e-3)
    assert cfg.model.backbone == vit_dir and cfg.train.dp.enabled == (dp is not None)
    _one_round_ran(run_federated(cfg))


def test_reproduce_with_the_paper_profile_skips_experiments_without_one(tmp_path):
    """`make reproduce PROFILE=paper` (tools/run_notebooks.py) runs only the notebooks whose experiment has a
    paper.yaml: the others are skipped and say so, and nothing is written for them."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FEDBENCH_RESULTS_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(root / "tools" / "run_notebooks.py"), "--profile", "paper", "--only",
                           "00_quickstart", "06_robustness"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("skipped") == 2 and "no configs/quickstart/paper.yaml" in proc.stdout
    assert not any(tmp_path.iterdir())
