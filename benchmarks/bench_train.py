"""Training throughput: `catdog train` vs a naive loop written like the book's, same images/model/batch/size.

The naive loop: ImageFolder-style dataset decoding every image every step with
Resize((S, S)) + ToTensor + Normalize, DataLoader(num_workers=0), fp32, default memory format, Adam.
`catdog train`: its defaults (bf16 autocast where the CPU has it, channels_last, RAM cache, fused Adam,
no loader worker processes on CPU). Both train from the same random init; images/s counts training steps only.

    python benchmarks/bench_train.py [--images 64] [--epochs 3] [--arch resnet50] [--image-size 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "catdog"
sys.path.insert(0, str(REPO))


def pick_images(root: Path, n: int) -> Path:
    """A temp ImageFolder of symlinks to n real photos (n/2 per class), plus 8 for a token val split."""
    from catdog_glm.vision.synthetic import make_synthetic_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if not (SHARED / "train").is_dir():
        print(f"note: {SHARED} not found, using drawn 400 px images instead of photos")
        return make_synthetic_dataset(tmp, per_class=n // 2 + 4, val_fraction=4 / (n // 2 + 4), image_size=400)
    for cls in ("cat", "dog"):
        for split, count in (("train", n // 2), ("val", 4)):
            (tmp / split / cls).mkdir(parents=True)
            for p in sorted((SHARED / split / cls).glob("*.jpg"))[:count]:
                os.symlink(p, tmp / split / cls / p.name)
    return tmp


def naive_loop(data: Path, arch: str, image_size: int, batch_size: int, epochs: int) -> list[float]:
    """The book's training loop, timed per epoch (images/s)."""
    import torch
    import torchvision
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    files = sorted((data / "train").glob("*/*"))
    classes = sorted({p.parent.name for p in files})

    class BookDataset(Dataset):
        def __init__(self):
            self.transform = transforms.Compose(
                [
                    transforms.Resize((image_size, image_size)),
                    transforms.ToTensor(),
                    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
                ]
            )

        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return self.transform(Image.open(files[i]).convert("RGB")), classes.index(files[i].parent.name)

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    loader = DataLoader(BookDataset(), batch_size=batch_size, shuffle=True)
    speeds = []
    model.train()
    for _ in range(epochs):
        started, seen = time.perf_counter(), 0
        for images, labels in loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        speeds.append(seen / (time.perf_counter() - started))
    return speeds


def catdog_run(data: Path, arch: str, image_size: int, batch_size: int, epochs: int):
    from catdog_glm.config import TrainConfig
    from catdog_glm.device import resolve_device, resolve_precision
    from catdog_glm.vision.trainer import TrainCallbacks, train

    out = Path(tempfile.mkdtemp(prefix="bench-train-out-"))
    cfg = TrainConfig(
        data=str(data),
        output=str(out),
        arch=arch,
        pretrained="none",
        epochs=epochs,
        batch_size=batch_size,
        image_size=image_size,
        tracker="none",
        patience=0,
        progress=False,
    )

    class CacheTimer(TrainCallbacks):
        fill_started = fill_seconds = None

        def on_prepare(self, description, total):
            self.fill_started = time.perf_counter()

        def on_epoch_start(self, epoch, epochs, steps):
            if self.fill_started is not None and self.fill_seconds is None:
                self.fill_seconds = time.perf_counter() - self.fill_started

    timer = CacheTimer()
    result = train(cfg, timer)
    precision = resolve_precision(resolve_device("auto")).name
    return [row["images_per_s"] for row in result.history], precision, timer.fill_seconds or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="training images (half cats, half dogs)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs for each side; medians are reported")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import torch

    data = pick_images(SHARED, args.images)
    print(
        f"bench_train: {args.arch} {args.image_size}px batch {args.batch_size}, {args.images} images, "
        f"{args.epochs} epochs each, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    naive = naive_loop(data, args.arch, args.image_size, args.batch_size, args.epochs)
    print("  naive (book) loop  images/s per epoch: " + ", ".join(f"{s:.2f}" for s in naive))
    ours, precision, fill_seconds = catdog_run(data, args.arch, args.image_size, args.batch_size, args.epochs)
    print(f"  catdog train ({precision}) images/s per epoch: " + ", ".join(f"{s:.2f}" for s in ours))
    naive_median, ours_median = statistics.median(naive), statistics.median(ours)
    # End to end: the whole run's training images over the time spent on them, the RAM-cache fill included.
    naive_e2e = args.images * len(naive) / sum(args.images / s for s in naive)
    ours_e2e = args.images * len(ours) / (fill_seconds + sum(args.images / s for s in ours))
    print(f"naive median   {naive_median:7.2f} images/s   end to end {naive_e2e:7.2f}")
    print(
        f"catdog median  {ours_median:7.2f} images/s   end to end {ours_e2e:7.2f} (RAM cache fill {fill_seconds:.1f} s)"
    )
    print(f"ratio          {ours_median / naive_median:7.2f}x            end to end {ours_e2e / naive_e2e:6.2f}x")


if __name__ == "__main__":
    main()
