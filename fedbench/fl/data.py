"""The loop's data: a task cut into clients and tokenized (:class:`FederatedData`), the seeded subsample,
partition and validation carve of a config, and the text / image encoders of a backbone.

:func:`prepare_data` is what a run of a config trains and is tested on; :func:`prepare_validation` the same
clients evaluated on a validation carve of the *training* split (what hyper-parameters are chosen on).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fedbench.fl.seeding import derive_seed, rng_for
from fedbench.models import load_tokenizer
from fedbench.models.inputs import TokenizedSplit, tokenize_split
from fedbench.options import Options, check_bool, check_int, options_of
from fedbench.registry import FEDERATIONS


@dataclass
class FederatedData:
    """A task cut into clients and tokenized."""
    train: TokenizedSplit
    test: TokenizedSplit
    client_indices: list[np.ndarray]     # indices into `train`, one array per client
    test_indices: np.ndarray             # the test examples evaluated each round
    class_names: list[str]
    pad_id: int
    # the run fills its activation caches with every example up front, in one fixed order (a federation whose
    # experiment shares prefilled caches across runs: a run built from the config alone computes the same values)
    prefill: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.class_names)


def subsample(n: int, k: int | None, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if k is None or k >= n else np.sort(rng.choice(n, size=k, replace=False))


def train_subsample(cfg, n_train: int) -> np.ndarray:
    """The training examples the clients get (seeded by ``cfg.seed``): one draw for :func:`prepare_data` and
    :func:`validation_indices`, so the validation examples always lie outside it."""
    return subsample(n_train, cfg.data.max_train_samples, rng_for(cfg.seed, "subsample", 0))


def partition_clients(labels: np.ndarray, data_cfg, seed: int) -> list[np.ndarray]:
    from fedbench.data import partition_dirichlet, partition_iid, partition_quantity_skew
    s = derive_seed(seed, "partition")
    if data_cfg.partition == "iid":
        return partition_iid(labels, data_cfg.num_clients, seed=s)
    if data_cfg.partition == "dirichlet":
        return partition_dirichlet(labels, data_cfg.num_clients, alpha=data_cfg.alpha, seed=s)
    return partition_quantity_skew(len(labels), data_cfg.num_clients, alpha=data_cfg.alpha, seed=s)


def prepare_data(cfg) -> FederatedData:
    """Load `cfg.data.task`, subsample (seeded), partition into clients (seeded), tokenize (cached) or, for an
    image task, keep the images for the vision backbone's per-batch preprocessing."""
    from fedbench.data import load_task
    ds = load_task(cfg.data.task)
    image_task = "image" in ds["train"].column_names
    encode = image_encoder(cfg) if image_task else text_encoder(cfg)
    train_idx = train_subsample(cfg, len(ds["train"]))
    test_idx = subsample(len(ds["test"]), cfg.data.max_test_samples, rng_for(cfg.seed, "subsample", 1))
    train_ds = ds["train"].select(train_idx)
    labels = train_ds.with_format("numpy")["label"][:]
    if cfg.data.num_clients > len(labels):
        from fedbench.config import ConfigError
        raise ConfigError("data.num_clients", cfg.data.num_clients, f"at most the {len(labels)} training samples")
    encoded, pad_id = encode
    return FederatedData(
        train=encoded(train_ds),
        test=encoded(ds["test"]),
        client_indices=partition_clients(labels, cfg.data, cfg.seed),
        test_indices=test_idx,
        class_names=list(ds["train"].features["label"].names),
        pad_id=pad_id,
    )


def validation_indices(cfg, size: int, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(the clients' subsample, `size` validation indices) into a training split of `n_train` examples: the
    validation examples lie outside the subsample :func:`prepare_data` draws, drawn seeded by ``cfg.seed``."""
    from fedbench.config import ConfigError
    used = train_subsample(cfg, n_train)
    spare = np.setdiff1d(np.arange(n_train), used)
    if not (isinstance(size, int) and not isinstance(size, bool) and 2 <= size <= len(spare)):
        raise ConfigError("validation_samples", size, f"an integer in [2, {len(spare)}] (the training examples of "
                          f"{cfg.data.task!r} outside the clients' {len(used)})")
    return used, np.sort(rng_for(cfg.seed, "subsample", 2).choice(spare, size=size, replace=False))


def prepare_validation(cfg, size: int, data: FederatedData | None = None) -> FederatedData:
    """`cfg`'s clients (as :func:`prepare_data` cuts them) evaluated on a validation set instead of the test
    split: `size` examples of the task's *training* split outside the clients' subsample
    (:func:`validation_indices`). The returned data holds no test example: this is what hyper-parameters are
    chosen on. Raises ConfigError if the training split has fewer than `size` spare examples."""
    from fedbench.data import load_task
    data = data or prepare_data(cfg)
    ds = load_task(cfg.data.task)["train"]
    _, val_idx = validation_indices(cfg, size, len(ds))
    encoded, _ = image_encoder(cfg) if "image" in ds.column_names else text_encoder(cfg)
    return dataclasses.replace(data, test=encoded(ds.select(val_idx)), test_indices=np.arange(size))


def backbone_config(cfg):
    from fedbench.models.backbone import pretrained_config
    return pretrained_config(cfg.model.backbone)


def text_encoder(cfg):
    from fedbench.models.vision import is_vision_config
    if cfg.model.backbone != "minilm" and is_vision_config(backbone_config(cfg)):
        from fedbench.config import ConfigError
        raise ConfigError("model.backbone", cfg.model.backbone,
                          f"a text encoder for the text task {cfg.data.task!r} (this is an image backbone)")
    tok = load_tokenizer(cfg.model.backbone)
    return (lambda ds: tokenize_split(ds, tok, cfg.data.max_length)), tok.pad_token_id or 0


def image_encoder(cfg):
    from fedbench.config import ConfigError
    from fedbench.models.inputs import image_split
    from fedbench.models.vision import image_normalization, is_vision_config
    if cfg.model.backbone == "minilm":
        raise ConfigError("model.backbone", cfg.model.backbone,
                          f"an image-classification backbone for the image task {cfg.data.task!r}: a Hugging Face "
                          "ViT id (needs the hub, e.g. 'google/vit-base-patch16-224-in21k') or a local ViT folder. "
                          "No vision backbone ships offline yet (a later issue)")
    config = backbone_config(cfg)
    if not is_vision_config(config):
        raise ConfigError("model.backbone", cfg.model.backbone,
                          f"an image backbone for the image task {cfg.data.task!r} (this is a text encoder)")
    mean, std = image_normalization(cfg.model.backbone)
    return (lambda ds: image_split(ds, config.image_size, config.num_channels, mean, std)), 0


def build_data(cfg) -> FederatedData:
    """The data of the run `cfg`: its federation (``data.federation``, :data:`fedbench.registry.FEDERATIONS`)
    built with its options. The one entry point for the loop, the experiments and Flower's workers."""
    opts = options_of(FEDERATIONS, cfg.data.federation, cfg.data.federation_options, "data.federation_options")
    build = FEDERATIONS.get(cfg.data.federation)
    return build(cfg) if opts is None else build(cfg, opts)


@dataclass(frozen=True)
class SingleOptions(Options):
    """``validation``: evaluate on that many rows of the task's *training* split outside the clients' subsample
    (:func:`prepare_validation`: what hyper-parameters are chosen on) instead of the test split (None);
    ``prefill``: fill the activation caches with every training row and every evaluated row up front, in one
    fixed order, as an experiment sharing caches across its runs does (a cached value computed in another batch
    can differ in its last bits, so how the caches fill is part of what a run is)."""
    validation: int | None = None
    prefill: bool = False

    def validate(self, prefix):
        if self.validation is not None:
            check_int(f"{prefix}.validation", self.validation, 2)
        check_bool(f"{prefix}.prefill", self.prefill)


@FEDERATIONS.register("single", options=SingleOptions)
def build_single(cfg, o: SingleOptions) -> FederatedData:
    """``data.task`` subsampled and cut into ``data.num_clients`` clients (:func:`prepare_data`), evaluated on its
    test split or a validation carve."""
    data = prepare_data(cfg)
    if o.validation is not None:
        data = prepare_validation(cfg, o.validation, data)
    return dataclasses.replace(data, prefill=o.prefill)
