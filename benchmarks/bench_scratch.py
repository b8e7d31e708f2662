"""Accuracy from scratch in a fixed CPU budget: the scratch recipe vs the README's former best flags, same photos.

Both run through the real CLI on all 1,200 training photos of ../shared/data/catdog and are scored on its 300 val
photos by `catdog eval` (so a test-time flip counts only where the checkpoint records it):

- baseline: `--arch resnet18 --image-size 128 --epochs 30 --lr 1e-3 --augment --recipe book --pretrained none`
  (the best flags the README suggested before the recipe existed: 78.3% in 10.9 min when the issue measured it);
- recipe:   `--pretrained none` (the scratch recipe: see README, "From scratch").

It prints val accuracy, wall time and the ablation the recipe's own checkpoint allows for free: its EMA weights vs
the raw weights being trained, each with and without the test-time flip. Takes about 40 minutes on 2 cores.

    python benchmarks/bench_scratch.py [--skip-baseline] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "catdog"
sys.path.insert(0, str(REPO))

BASELINE = ["--arch", "resnet18", "--image-size", "128", "--epochs", "30", "--lr", "1e-3", "--augment"]
BASELINE += ["--recipe", "book"]


def catdog(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catdog_glm", *args], capture_output=True, text=True)


def train(name: str, output: Path, extra: list[str]) -> float:
    started = time.perf_counter()
    args = ["train", "--data", str(SHARED), "--pretrained", "none", "--output", str(output), "--tracker", "none"]
    done = catdog(*args, "--no-progress", *extra)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return seconds


def val_accuracy(checkpoint: Path) -> float:
    done = catdog("eval", "--checkpoint", str(checkpoint), "--data", str(SHARED / "val"), "--json")
    if done.returncode != 0:
        sys.exit(f"eval failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)["accuracy"]


def weight_ablation(run: Path) -> dict[str, float]:
    """Val accuracy of the run's last EMA weights and of its raw (trained) weights, with and without the flip, at
    the size it trained at and at the size it scores at (FixRes)."""
    import torch

    from catdog_glm.config import TrainConfig
    from catdog_glm.device import resolve_precision
    from catdog_glm.vision.checkpoint import build_model_from_checkpoint, load_checkpoint
    from catdog_glm.vision.data import discover
    from catdog_glm.vision.evaluate import InferenceSpec, evaluate
    from catdog_glm.vision.loader import ImageDataset, build_loader

    last = load_checkpoint(run / "last.pt")
    val = discover(str(SHARED)).split("val")
    ema = build_model_from_checkpoint(last)
    raw = build_model_from_checkpoint(last)
    raw.load_state_dict(last.raw["training_state"]["raw_model"])
    sizes = sorted({TrainConfig.from_dict(last.config).final_train_size, last.image_size})
    out = {}
    for size in sizes:
        loader = build_loader(ImageDataset(val, size), batch_size=50, shuffle=False, workers=0)
        for name, model in (("EMA", ema), ("raw", raw)):
            for tta in (False, True):
                spec = InferenceSpec(
                    torch.device("cpu"),
                    resolve_precision(torch.device("cpu"), "auto"),  # as `catdog eval` scores
                    mean=last.mean,
                    std=last.std,
                    tta=tta,
                )
                result = evaluate(model.to(memory_format=torch.channels_last), loader, classes=last.classes, spec=spec)
                out[f"{name} weights at {size} px, {'flip' if tta else 'no flip'}"] = result.accuracy
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-baseline", action="store_true", help="time only the recipe")
    parser.add_argument("--epochs", type=int, default=0, help="recipe epochs (default: the recipe's own)")
    args = parser.parse_args()
    if not (SHARED / "train").is_dir():
        sys.exit(f"{SHARED} not found: this benchmark needs the real photos")
    work = Path(tempfile.mkdtemp(prefix="bench-scratch-"))
    rows = []
    if not args.skip_baseline:
        seconds = train("baseline", work / "baseline", BASELINE)
        rows.append(("former README flags (book recipe)", val_accuracy(work / "baseline" / "best.pt"), seconds))
    recipe_extra = ["--epochs", str(args.epochs)] if args.epochs else []
    seconds = train("recipe", work / "recipe", recipe_extra)
    rows.append(("scratch recipe (--pretrained none)", val_accuracy(work / "recipe" / "best.pt"), seconds))
    print(f"{'':40s} {'val acc':>8s} {'minutes':>8s}")
    for name, acc, secs in rows:
        print(f"{name:40s} {acc:8.2%} {secs / 60:8.1f}")
    if len(rows) == 2:
        print(
            f"recipe vs former flags: {rows[1][1] - rows[0][1]:+.1%} val accuracy, {rows[1][2] / rows[0][2]:.2f}x time"
        )
    print("the recipe's weights (last epoch):")
    for name, acc in weight_ablation(work / "recipe").items():
        print(f"  {name:36s} {acc:.2%}")


if __name__ == "__main__":
    main()
