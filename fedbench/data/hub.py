"""Hugging Face hub tasks (GLUE, CIFAR, AG News), mapped to fedbench's task schema.

Users with internet get the real data through ``datasets.load_dataset``; anyone can pass local
files in the hub's own schema (``local_files={"train": ..., "test": ...}``, parquet/csv/json by
extension), which go through the same mapping. Offline, a hub task raises
:class:`~fedbench.data.sources.TaskUnavailableError` that names the offline tasks to use instead.

Mapping to the schema of :func:`fedbench.data.load_task`:

- GLUE: ``train`` -> ``train``; ``validation`` -> ``test`` (GLUE's own test labels are hidden,
  stored as -1). Single-sentence tasks give ``text``; pair tasks give ``text`` + ``text_pair``.
  Rows with a negative label (unlabelled) are dropped.
- AG News (AutoFedNLP's main task): ``text`` and ``label`` as they are; its ``test`` split is the test.
- CIFAR-10/100: ``img`` -> ``image``; CIFAR-100 uses ``fine_label`` as ``label``. Images are
  decoded once into ``datasets.Array3D((32, 32, 3), 'uint8')`` (RGB), matching the offline image
  tasks, which store uint8 arrays too; no torchvision/PIL is needed downstream.
- Local files: ``validation`` is used as test when present (hub semantics), else ``test``. An
  image column may hold what the hub's parquet holds (``{'bytes', 'path'}`` structs / an
  ``Image`` feature) or plain nested lists of uint8 pixels.

Hub downloads go to the Hugging Face cache (``~/.cache/huggingface``, so data you already have is
found offline) unless ``cache_dir`` is given, in which case ``<cache_dir>/hf`` is used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from fedbench.data.sources import OFFLINE_TASKS, TaskInfo, TaskUnavailableError, _fresh_view

__all__ = ["HUB_TASK_SPECS", "hub_task_info", "load_hub_task", "map_hub_to_schema"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
    camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
    dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
    leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid
    otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray
    road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
    sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
    wardrobe whale willow_tree wolf woman worm""".split()
)


@dataclass(frozen=True)
class HubTaskSpec:
    """Where a hub task lives and how its columns map onto ours."""

    name: str
    hub_id: str
    config: str | None
    text_columns: tuple[str, ...]  # hub columns that become ("text",) or ("text", "text_pair")
    image_column: str | None
    image_shape: tuple[int, ...] | None
    label_column: str
    class_names: tuple[str, ...]
    test_split: str  # the hub split that becomes our "test"
    n_train: int  # sizes the hub publishes for train / test_split (not verifiable offline)
    n_test: int
    description: str

    @property
    def modality(self) -> str:
        return "image" if self.image_column else "text"

    @property
    def source(self) -> str:
        return f"hf:{self.hub_id}" + (f" ({self.config})" if self.config else "")


def _glue(config, *, columns, class_names, n_train, n_test, description) -> HubTaskSpec:
    return HubTaskSpec(
        name=f"glue/{config}", hub_id="nyu-mll/glue", config=config, text_columns=columns,
        image_column=None, image_shape=None, label_column="label", class_names=class_names,
        test_split="validation", n_train=n_train, n_test=n_test, description=description,
    )  # fmt: skip


def _cifar(name, *, label_column, class_names, description) -> HubTaskSpec:
    return HubTaskSpec(
        name=name, hub_id=f"uoft-cs/{name}", config=None, text_columns=(), image_column="img",
        image_shape=(32, 32, 3), label_column=label_column, class_names=class_names, test_split="test",
        n_train=50000, n_test=10000, description=description,
    )  # fmt: skip


def _ag_news() -> HubTaskSpec:
    return HubTaskSpec(
        name="ag_news", hub_id="fancyzhx/ag_news", config=None, text_columns=("text",), image_column=None,
        image_shape=None, label_column="label", class_names=("World", "Sports", "Business", "Sci/Tech"),
        test_split="test", n_train=120000, n_test=7600, description="AG News topic classification, 4 classes",
    )  # fmt: skip


HUB_TASK_SPECS: dict[str, HubTaskSpec] = {
    spec.name: spec
    for spec in (
        _glue("sst2", columns=("sentence",), class_names=("negative", "positive"),
              n_train=67349, n_test=872, description="GLUE SST-2 movie sentiment"),
        _glue("qnli", columns=("question", "sentence"), class_names=("entailment", "not_entailment"),
              n_train=104743, n_test=5463, description="GLUE QNLI: does the sentence answer the question"),
        _glue("qqp", columns=("question1", "question2"), class_names=("not_duplicate", "duplicate"),
              n_train=363846, n_test=40430, description="GLUE QQP: are the two Quora questions duplicates"),
        _glue("rte", columns=("sentence1", "sentence2"), class_names=("entailment", "not_entailment"),
              n_train=2490, n_test=277, description="GLUE RTE textual entailment"),
        _glue("mrpc", columns=("sentence1", "sentence2"), class_names=("not_equivalent", "equivalent"),
              n_train=3668, n_test=408, description="GLUE MRPC paraphrase detection"),
        _cifar("cifar10", label_column="label", class_names=CIFAR10_CLASSES,
               description="CIFAR-10 32x32 RGB images, 10 classes"),
        _cifar("cifar100", label_column="fine_label", class_names=CIFAR100_CLASSES,
               description="CIFAR-100 32x32 RGB images, 100 fine classes"),
        _ag_news(),
    )
}  # fmt: skip

_LOCAL_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def hub_task_info(name: str) -> TaskInfo:
    spec = HUB_TASK_SPECS[name]
    return TaskInfo(
        name=spec.name,
        source=spec.source,
        modality=spec.modality,
        num_classes=len(spec.class_names),
        class_names=spec.class_names,
        n_train=spec.n_train,
        n_test=spec.n_test,
        offline=False,
        description=spec.description + f" (hub '{spec.test_split}' split used as test)",
    )


# --------------------------------------------------------------------------------------------
# Mapping hub schema -> fedbench schema
# --------------------------------------------------------------------------------------------


def _require_columns(ds: datasets.Dataset, columns: list[str], spec: HubTaskSpec, split: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{spec.name}: split {split!r} lacks hub columns {missing}; it has {ds.column_names}, "
            f"expected the hub schema {columns}"
        )


def _column_as_numpy(ds: datasets.Dataset, column: str) -> np.ndarray:
    # Column[:] on a numpy-formatted dataset reads just that column, vectorised
    # (np.asarray(ds[column]) would iterate row by row).
    return np.asarray(ds.with_format("numpy")[column][:])


def _drop_unlabelled(ds: datasets.Dataset, label_column: str) -> datasets.Dataset:
    labels = _column_as_numpy(ds, label_column)
    if (labels >= 0).all():
        return ds
    return ds.select(np.flatnonzero(labels >= 0))


def _check_label_range(ds: datasets.Dataset, spec: HubTaskSpec, split: str) -> None:
    labels = _column_as_numpy(ds, "label")
    if len(labels) and labels.max() >= len(spec.class_names):
        raise ValueError(
            f"{spec.name}: split {split!r} has label {labels.max()}, but the task has only "
            f"{len(spec.class_names)} classes {spec.class_names}"
        )


def _as_uint8_image(value, shape: tuple[int, ...]) -> np.ndarray:
    """One decoded image (PIL image or nested pixel lists) as a uint8 array of ``shape``."""
    if hasattr(value, "convert"):  # PIL.Image.Image, from a datasets Image feature
        value = value.convert("RGB" if len(shape) == 3 else "L")
    array = np.asarray(value, dtype=np.uint8)
    if array.shape != shape:
        raise ValueError(f"image of shape {array.shape}, expected {shape}")
    return array


def _map_image_split(ds: datasets.Dataset, spec: HubTaskSpec) -> datasets.Dataset:
    column = spec.image_column
    if isinstance(ds.features[column], dict) and set(ds.features[column]) >= {"bytes"}:
        # A parquet file without datasets' metadata reads the encoded image as a bytes/path struct.
        ds = ds.cast_column(column, datasets.Image())
    features = datasets.Features(
        {
            "image": datasets.Array3D(shape=spec.image_shape, dtype="uint8"),
            "label": datasets.ClassLabel(names=list(spec.class_names)),
        }
    )

    def decode(batch):
        return {
            "image": [_as_uint8_image(v, spec.image_shape) for v in batch[column]],
            "label": batch[spec.label_column],
        }

    return ds.map(
        decode, batched=True, batch_size=1000, remove_columns=ds.column_names, features=features,
        desc=f"decoding {spec.name} images",
    )  # fmt: skip


def _map_text_split(ds: datasets.Dataset, spec: HubTaskSpec) -> datasets.Dataset:
    targets = ("text", "text_pair")[: len(spec.text_columns)]
    ds = ds.select_columns([*spec.text_columns, spec.label_column])
    ds = ds.rename_columns({**dict(zip(spec.text_columns, targets)), spec.label_column: "label"})
    features = datasets.Features(
        {
            **{name: datasets.Value("string") for name in targets},
            "label": datasets.ClassLabel(names=list(spec.class_names)),
        }
    )
    return ds.cast(features)


def _map_split(ds: datasets.Dataset, spec: HubTaskSpec, split: str) -> datasets.Dataset:
    source_columns = [*spec.text_columns, *([spec.image_column] if spec.image_column else []), spec.label_column]
    _require_columns(ds, source_columns, spec, split)
    ds = _drop_unlabelled(ds, spec.label_column)
    mapped = _map_image_split(ds, spec) if spec.image_column else _map_text_split(ds, spec)
    _check_label_range(mapped, spec, split)
    return mapped


def map_hub_to_schema(raw: datasets.DatasetDict, spec: HubTaskSpec) -> datasets.DatasetDict:
    """Map a DatasetDict in the hub's schema to ``{train, test}`` in fedbench's schema.

    The hub's ``spec.test_split`` (``validation`` for GLUE) becomes ``test``; if it is absent
    (e.g. local files named ``train``/``test``), ``test`` is used as is.
    """
    test_split = spec.test_split if spec.test_split in raw else "test"
    for split in ("train", test_split):
        if split not in raw:
            raise ValueError(f"{spec.name}: need splits 'train' and '{spec.test_split}' (or 'test'); got {sorted(raw)}")
    return datasets.DatasetDict(
        {"train": _map_split(raw["train"], spec, "train"), "test": _map_split(raw[test_split], spec, test_split)}
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _hf_cache_dir(cache_dir: str | Path | None) -> str | None:
    return None if cache_dir is None else str(Path(cache_dir).expanduser() / "hf")


def _load_local_files(local_files: dict, cache_dir: str | Path | None) -> datasets.DatasetDict:
    """Read ``{split: path}`` with the datasets builder matching the files' extension."""
    if not isinstance(local_files, dict) or not local_files:
        raise ValueError(f"local_files must be a non-empty dict {{split: path}}, got {local_files!r}")
    data_files = {split: str(Path(path).expanduser()) for split, path in local_files.items()}
    suffixes = {Path(path).suffix.lower() for path in data_files.values()}
    builders = {_LOCAL_FILE_BUILDERS.get(suffix) for suffix in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"local_files must all be one of {sorted(_LOCAL_FILE_BUILDERS)}; got extensions {sorted(suffixes)}"
        )
    for path in data_files.values():
        if not Path(path).is_file():
            raise FileNotFoundError(f"local file {path} does not exist")
    return datasets.load_dataset(builders.pop(), data_files=data_files, cache_dir=_hf_cache_dir(cache_dir))


def _load_from_hub(spec: HubTaskSpec, cache_dir: str | Path | None) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(spec.hub_id, spec.config, cache_dir=_hf_cache_dir(cache_dir))
    except Exception as error:  # offline flag, ConnectionError, missing repo, ...: all mean "not here"
        raise TaskUnavailableError(
            f"hub task {spec.name!r} ({spec.source}) could not be loaded from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Without hub access use an offline task instead: "
            f"{', '.join(OFFLINE_TASKS)}; or pass local_files={{'train': ..., 'test': ...}} in the "
            "hub's schema."
        ) from error


@functools.lru_cache(maxsize=None)
def _load_hub_cached(name: str, cache_dir: str | None) -> datasets.DatasetDict:
    spec = HUB_TASK_SPECS[name]
    return map_hub_to_schema(_load_from_hub(spec, cache_dir), spec)


def load_hub_task(
    name: str, *, local_files: dict | None = None, cache_dir: str | Path | None = None
) -> datasets.DatasetDict:
    """Load hub task ``name`` (see module docstring for the mapping) as ``{train, test}``."""
    if name not in HUB_TASK_SPECS:
        raise ValueError(f"unknown hub task {name!r}; allowed: {', '.join(HUB_TASK_SPECS)}")
    if local_files is not None:  # files may change between calls: never memoised
        spec = HUB_TASK_SPECS[name]
        return map_hub_to_schema(_load_local_files(local_files, cache_dir), spec)
    cache_key = None if cache_dir is None else str(Path(cache_dir).expanduser().resolve())
    return _fresh_view(_load_hub_cached(name, cache_key))
