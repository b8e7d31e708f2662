"""`catdog data check`: decode every file of a dataset and report what a training run would meet."""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from catdog_glm.errors import ImageError
from catdog_glm.vision.data import discover
from catdog_glm.vision.images import is_image_file, open_image


@dataclass
class DataReport:
    root: Path
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> readable images
    bad_files: list[str] = field(default_factory=list)  # "path: reason"
    ignored_files: list[Path] = field(default_factory=list)  # files that are not images
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def size_stats(self) -> dict[str, dict[str, float]]:
        def stats(values):
            if not values:
                return {}
            return {
                "min": min(values),
                "median": statistics.median(values),
                "mean": statistics.fmean(values),
                "max": max(values),
            }

        return {"width": stats(self.widths), "height": stats(self.heights)}


def _probe(path: Path):
    """(width, height, original mode) after a full decode, or the reason it failed."""
    from PIL import Image

    try:
        with Image.open(path) as raw:
            mode = raw.mode
    except Exception:
        mode = "?"
    img = open_image(path)
    return img.width, img.height, mode


def check_dataset(
    root: str | Path, *, val_split: float = 0.2, seed: int = 42, threads: int = 4, on_progress=None
) -> DataReport:
    """Fully decode every image of the dataset under `root` (in threads: Pillow releases the GIL)."""
    dataset = discover(root, val_split=val_split, seed=seed)
    report = DataReport(root=dataset.root, layout=dataset.layout, classes=dataset.classes, counts={})
    listed = {s.path.resolve() for samples in dataset.splits.values() for s in samples}
    report.ignored_files = sorted(
        p
        for p in dataset.root.rglob("*")
        if p.is_file()
        and not is_image_file(p)
        and p.suffix.lower() not in (".csv", ".txt", ".md")
        and p.resolve() not in listed
    )
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for split, samples in dataset.splits.items():
            counts = dict.fromkeys(dataset.classes, 0)

            def probe(sample):
                try:
                    return sample, _probe(sample.path), None
                except ImageError as e:
                    return sample, None, str(e)

            for sample, info, error in pool.map(probe, samples):
                if error:
                    report.bad_files.append(error)
                else:
                    width, height, mode = info
                    counts[dataset.classes[sample.label]] += 1
                    report.widths.append(width)
                    report.heights.append(height)
                    report.modes[mode] = report.modes.get(mode, 0) + 1
                if on_progress:
                    on_progress(1)
            report.counts[split] = counts
    return report


def count_files(root: str | Path, *, val_split: float = 0.2, seed: int = 42) -> int:
    dataset = discover(root, val_split=val_split, seed=seed)
    return sum(len(s) for s in dataset.splits.values())
