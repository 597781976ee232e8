"""Image transforms without torchvision: Pillow in, normalized tensors out.

Every random transform takes an explicit ``numpy.random.Generator``. The training loop derives
that generator from (seed, epoch, sample index) or (seed, epoch, step), so augmentation does not
depend on the number of loader workers, and a run resumed mid-epoch draws the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Domain tags keep the random streams of different uses apart (see ``rng_for``).
_TAG_SAMPLE = 1
_TAG_BATCH = 2


def rng_for(seed: int, epoch: int, index: int, tag: int = _TAG_SAMPLE) -> np.random.Generator:
    """A generator fixed by (seed, epoch, index): sample ``index`` (or step) of ``epoch``."""
    return np.random.default_rng([seed, epoch, index, tag])


def batch_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """The generator of batch-level augmentation (mixup/cutmix) at ``step`` of ``epoch``."""
    return rng_for(seed, epoch, step, _TAG_BATCH)


def _resample(name: str):
    from PIL import Image

    table = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }
    return table[name]


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to size^2."""

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
    ) -> None:
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = interpolation

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop in the source image."""
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        # Fallback: the largest central crop whose aspect ratio is within range.
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, img, rng: np.random.Generator):
        box = self.box(img.width, img.height, rng)
        return img.resize((self.size, self.size), _resample(self.interpolation), box=box)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, img, rng: np.random.Generator):
        from PIL import Image

        if self.p > 0 and rng.random() < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class ResizeCenterCrop:
    """Evaluation view: scale the short side to ``size / crop_pct``, then a central size^2 crop."""

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> None:
        self.size = int(size)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation

    def __call__(self, img, rng: np.random.Generator | None = None):
        # One resize with a source box: the crop of side size/scale around the centre.
        scale = (self.size / self.crop_pct) / min(img.width, img.height)
        side = self.size / scale
        left = (img.width - side) / 2
        top = (img.height - side) / 2
        box = (left, top, left + side, top + side)
        return img.resize((self.size, self.size), _resample(self.interpolation), box=box)


class ToNormalizedTensor:
    """PIL image [H, W, C] uint8 -> float tensor [C, H, W], (x / 255 - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img, rng: np.random.Generator | None = None) -> torch.Tensor:
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std


class RandomErasing:
    """Replace a random rectangle of a normalized tensor [C, H, W] with Gaussian noise."""

    def __init__(
        self,
        p: float = 0.25,
        area: Sequence[float] = (0.02, 1 / 3),
        log_aspect: Sequence[float] = (math.log(0.3), math.log(1 / 0.3)),
    ) -> None:
        self.p = float(p)
        self.area = (float(area[0]), float(area[1]))
        self.log_aspect = (float(log_aspect[0]), float(log_aspect[1]))

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.p <= 0 or rng.random() >= self.p:
            return x
        c, height, width = x.shape
        for _ in range(10):
            target = height * width * rng.uniform(*self.area)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h < height and 0 < w < width:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                noise = torch.from_numpy(rng.standard_normal((c, h, w), dtype=np.float32))
                x = x.clone()
                x[:, top : top + h, left : left + w] = noise
                return x
        return x


class Compose:
    """Apply transforms in order; each takes (value, rng)."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, value, rng: np.random.Generator | None):
        for t in self.transforms:
            value = t(value, rng)
        return value


def train_transform(
    img_size: int,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    reprob: float = 0.0,
    interpolation: str = "bicubic",
) -> Compose:
    """Random resized crop, horizontal flip, normalize, optional random erasing."""
    steps: list = [RandomResizedCrop(img_size, scale=scale, interpolation=interpolation)]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    steps.append(ToNormalizedTensor(mean, std))
    if reprob > 0:
        steps.append(RandomErasing(reprob))
    return Compose(steps)


def eval_transform(
    img_size: int,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
) -> Compose:
    return Compose(
        [ResizeCenterCrop(img_size, crop_pct, interpolation), ToNormalizedTensor(mean, std)]
    )


def random_shift(x: torch.Tensor, max_shift: int, fill: float, rng: np.random.Generator):
    """Translate x [C, H, W] by up to ``max_shift`` pixels each way, filling with ``fill``."""
    if max_shift <= 0:
        return x
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    if dy == 0 and dx == 0:
        return x
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=fill)
    h, w = x.shape[-2:]
    return padded[:, p + dy : p + dy + h, p + dx : p + dx + w]


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """labels [B] -> targets [B, num_classes] with ``smoothing`` spread over all classes."""
    off = smoothing / num_classes
    targets = torch.full(
        (labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32
    )
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


class MixupCutmix:
    """Batch-level mixup / cutmix (one lambda per batch; pairs each sample with the reversed batch).

    ``__call__(x [B, C, H, W], labels [B], rng)`` -> (mixed x, soft targets [B, num_classes]).
    With ``prob`` the batch is mixed; when both are enabled, cutmix is chosen with
    ``switch_prob``. Label smoothing is folded into the targets.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        self.num_classes = int(num_classes)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        if not self.enabled or rng.random() >= self.prob:
            return x, targets
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or rng.random() < self.switch_prob
        )
        if use_cutmix:
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            h, w = x.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually pasted
        else:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            x = x * lam + x.flip(0) * (1.0 - lam)
        return x, targets * lam + targets.flip(0) * (1.0 - lam)
