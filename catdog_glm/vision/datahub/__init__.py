"""Datasets by name into the ImageFolder layout `catdog train` reads: `catdog data pull ID`, `--data ID`.

Sources (one class each, registered in `core.SOURCES`): Hugging Face Hub parquet datasets (`owner/name[@rev]`),
ModelScope (`modelscope:owner/name`), Kaggle (`kaggle:competition`, `kaggle:owner/dataset`) and archive URLs."""

from catdog_glm.vision.datahub.base import DataRef, Fetched, PullProgress, Source
from catdog_glm.vision.datahub.core import (
    DEFAULT_SEED,
    DEFAULT_VAL_SPLIT,
    SOURCES,
    CachedDataset,
    PulledDataset,
    cached_dataset,
    datasets_dir,
    list_datasets,
    parse_data_ref,
    pull_dataset,
    register_source,
    resolve_data,
)

__all__ = [
    "DEFAULT_SEED",
    "DEFAULT_VAL_SPLIT",
    "SOURCES",
    "CachedDataset",
    "DataRef",
    "Fetched",
    "PullProgress",
    "PulledDataset",
    "Source",
    "cached_dataset",
    "datasets_dir",
    "list_datasets",
    "parse_data_ref",
    "pull_dataset",
    "register_source",
    "resolve_data",
]
