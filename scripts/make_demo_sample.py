#!/usr/bin/env python3
"""Write ``mqttinfer/data/fmnist-test-1000.npz``: the first 1000 Fashion-MNIST test images.

``mqttinfer demo`` streams these when the Debian package ``dataset-fashion-mnist`` is not
installed. They are the images the demo bundle's ``accuracy.first_1000`` was measured on, so
the demo's accuracy is comparable with either source. Fashion-MNIST is (c) Zalando SE, MIT
licence; the notice travels inside the file (arrays ``license`` and ``source``).

Usage: ``python scripts/make_demo_sample.py [--root /usr/share/datasets/fashion-mnist]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a clone, installed or not

from mqttinfer.datasets import FASHION_MNIST_DIR, load_fashion_mnist  # noqa: E402

COUNT = 1000
OUT = ROOT / "mqttinfer" / "data" / "fmnist-test-1000.npz"
LICENSE = (
    "Fashion-MNIST, https://github.com/zalandoresearch/fashion-mnist. "
    "The MIT License (MIT) Copyright (c) 2017 Zalando SE, https://tech.zalando.com. "
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
    "software and associated documentation files (the Software), to deal in the Software "
    "without restriction, including without limitation the rights to use, copy, modify, merge, "
    "publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons "
    "to whom the Software is furnished to do so, subject to the following conditions: The above "
    "copyright notice and this permission notice shall be included in all copies or substantial "
    "portions of the Software. THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, "
    "EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS "
    "FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT "
    "HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF "
    "CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE "
    "USE OR OTHER DEALINGS IN THE SOFTWARE."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    test = load_fashion_mnist(args.root, split="test")
    x = np.ascontiguousarray(test.x[:COUNT], dtype=np.uint8)  # [1000, 1, 28, 28]
    if test.y is None:
        raise SystemExit("the Fashion-MNIST test labels are missing")
    y = test.y[:COUNT].astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        x=x,
        y=y,
        license=np.array(LICENSE),
        source=np.array(f"first {COUNT} images of t10k-images-idx3-ubyte ({args.root})"),
    )
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size} bytes, x {list(x.shape)}, y {list(y.shape)})")


if __name__ == "__main__":
    main()
