"""Datasets: the embedded handwritten digits and ImageFolder-style directories.

Items are fetched with a :class:`SampleKey` (index, seed, epoch), so random augmentation is a
pure function of the key: independent of loader workers and reproducible after a resume.
A plain ``int`` key fetches the item without augmentation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import DataError
from .transforms import rng_for

DIGITS_FILE = Path(__file__).with_name("digits.npz")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLITS = ("train", "val")


class SampleKey(NamedTuple):
    """What a sampler hands a dataset: which item, and the (seed, epoch) of its augmentation."""

    index: int
    seed: int
    epoch: int

    def rng(self) -> np.random.Generator:
        return rng_for(self.seed, self.epoch, self.index)


class LoadFailure(NamedTuple):
    """Returned instead of an item that could not be read (raised as DataError in the trainer).

    Loader workers re-raise exceptions with a traceback pasted into the message; passing a
    marker back keeps the user's error message exactly one clear line.
    """

    message: str


def _unpack(key) -> tuple[int, np.random.Generator | None]:
    if isinstance(key, SampleKey):
        return key.index, key.rng()
    return int(key), None


def collate(batch: Sequence) -> tuple[torch.Tensor, torch.Tensor] | LoadFailure:
    """Stack (image [C, H, W], label) pairs -> (images [B, C, H, W], labels [B]) or a failure."""
    for item in batch:
        if isinstance(item, LoadFailure):
            return item
    images = torch.stack([item[0] for item in batch])
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.long)
    return images, labels


def raise_if_failed(batch):
    """The batch, or DataError with the reader's message if a sample could not be read."""
    if isinstance(batch, LoadFailure):
        raise DataError(batch.message)
    return batch


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (shipped in ``digits.npz``), upsampled bilinearly.

    ``split`` is "train" (1,437 images) or "test"/"val" (360 images), a fixed stratified split.
    Items are (image [1, img_size, img_size] normalized with the train mean/std, label in 0..9).
    With ``augment``, a :class:`SampleKey` key shifts the image by up to ``max_shift`` pixels.
    """

    classes = [str(i) for i in range(10)]
    in_chans = 1

    def __init__(
        self,
        split: str = "train",
        *,
        img_size: int = 32,
        augment: bool = False,
        max_shift: int = 2,
        path: str | os.PathLike | None = None,
    ) -> None:
        path = Path(path) if path is not None else DIGITS_FILE
        if split not in ("train", "val", "test"):
            raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
        try:
            with np.load(path) as data:
                images, labels = data["images"], data["labels"]
                train_idx, test_idx = data["train_idx"], data["test_idx"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"cannot read the embedded digits file {path}: {e}") from e
        idx = train_idx if split == "train" else test_idx
        x = torch.from_numpy(images[idx].astype(np.float32) / 255.0).unsqueeze(1)  # [N,1,8,8]
        if img_size != x.shape[-1]:
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        # Normalize with the statistics of the train split, whatever split this is.
        train_x = torch.from_numpy(images[train_idx].astype(np.float32) / 255.0)
        self.mean = (float(train_x.mean()),)
        self.std = (float(train_x.std()),)
        self.images = ((x - self.mean[0]) / self.std[0]).contiguous()
        self.labels = torch.from_numpy(labels[idx].astype(np.int64))
        self.fill = -self.mean[0] / self.std[0]  # the normalized value of a blank pixel
        self.augment = augment
        self.max_shift = int(max_shift)
        self.split = split

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key):
        from .transforms import random_shift

        index, rng = _unpack(key)
        x = self.images[index]
        if self.augment and rng is not None:
            x = random_shift(x, self.max_shift, self.fill, rng)
        return x, int(self.labels[index])


def _list_images(folder: Path) -> list[Path]:
    files = []
    for root, _dirs, names in os.walk(folder, followlinks=True):
        for name in names:
            if name.lower().endswith(IMG_EXTENSIONS):
                files.append(Path(root) / name)
    return sorted(files)


class ImageFolder(Dataset):
    """Images in ``root/<split>/<class>/*.jpg`` (any Pillow-readable file listed in IMG_EXTENSIONS).

    Class indices follow the sorted class folder names of the train split; pass ``classes`` to
    index another split the same way (it may hold a subset of the classes).
    ``transform(img, rng)`` maps a PIL image (RGB, or grey when ``in_chans`` is 1) to a tensor
    [C, H, W].
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable,
        *,
        classes: Sequence[str] | None = None,
        in_chans: int = 3,
    ) -> None:
        if in_chans not in (1, 3):
            raise DataError(f"image folders give 1 (grey) or 3 (RGB) channels, not {in_chans}")
        self.in_chans = in_chans
        self.root = Path(root)
        self.split = split
        self.transform = transform
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist")
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataError(
                f"missing split folder {split_dir} (expected the layout "
                f"{self.root}/train/<class>/*.jpg and {self.root}/val/<class>/*.jpg)"
            )
        class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
        if not class_dirs:
            raise DataError(f"no class folders in {split_dir} (expected {split_dir}/<class>/*.jpg)")
        names = [d.name for d in class_dirs]
        if classes is None:
            classes = names
        else:
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise DataError(
                    f"class folder {split_dir / unknown[0]} has no counterpart in the train split"
                )
        self.classes = list(classes)
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for d in class_dirs:
            files = _list_images(d)
            if not files:
                raise DataError(
                    f"empty class folder {d}: no image files ({', '.join(IMG_EXTENSIONS)})"
                )
            self.samples.extend((str(f), index[d.name]) for f in files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from PIL import Image

        index, rng = _unpack(key)
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if self.in_chans == 3 else "L")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return LoadFailure(f"cannot read image {path}: {e}")
        return self.transform(img, rng), label


class SubsetView(Dataset):
    """The items ``indices`` of ``dataset`` (keys are remapped, so augmentation still works)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        for name in ("classes", "in_chans", "mean", "std"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, SampleKey):
            return self.dataset[key._replace(index=self.indices[key.index])]
        return self.dataset[self.indices[int(key)]]


def take_subset(dataset: Dataset, max_samples: int | None, seed: int = 0) -> Dataset:
    """At most ``max_samples`` items, a fixed random choice (so classes stay mixed)."""
    if not max_samples or max_samples >= len(dataset):
        return dataset
    order = np.random.default_rng([seed, 12345]).permutation(len(dataset))[:max_samples]
    return SubsetView(dataset, np.sort(order))
