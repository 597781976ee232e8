"""Regenerate ``digits.npz``, the embedded default dataset (run once; needs scikit-learn).

scikit-learn's bundled handwritten digits: 1,797 grey images of 8x8 pixels with 17 levels
(0..16), ten classes. Stored as uint8 scaled to 0..255 together with a fixed stratified
80/20 train/test split, so training needs neither a download nor scikit-learn at run time.

    python -m vmamba.data.make_digits
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("digits.npz")
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def make(out: Path = OUT) -> Path:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
    labels = digits.target.astype(np.uint8)  # [N]
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        index, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    np.savez_compressed(
        out,
        images=images,
        labels=labels,
        train_idx=np.sort(train_idx).astype(np.int16),
        test_idx=np.sort(test_idx).astype(np.int16),
    )
    return out


if __name__ == "__main__":
    path = make()
    print(f"wrote {path} ({path.stat().st_size} bytes)")
