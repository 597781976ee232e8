"""Data for training and evaluation: the embedded digits, image folders, transforms, samplers."""

from .datasets import (
    DIGITS_FILE,
    IMG_EXTENSIONS,
    DigitsDataset,
    ImageFolder,
    LoadFailure,
    SampleKey,
    SubsetView,
    collate,
    raise_if_failed,
    take_subset,
)
from .errors import CheckpointError, ConfigError, DataError, UsageError
from .sampling import EvalBatchSampler, TrainBatchSampler, epoch_permutation
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MixupCutmix,
    batch_rng,
    eval_transform,
    train_transform,
)

__all__ = [
    "DIGITS_FILE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DigitsDataset",
    "EvalBatchSampler",
    "ImageFolder",
    "LoadFailure",
    "MixupCutmix",
    "SampleKey",
    "SubsetView",
    "TrainBatchSampler",
    "UsageError",
    "batch_rng",
    "collate",
    "epoch_permutation",
    "eval_transform",
    "raise_if_failed",
    "take_subset",
    "train_transform",
]
