"""Prediction throughput and latency: catdog's batched predictor vs the book's one-image `predict()`.

Same model (a ResNet50 checkpoint with random weights: speed does not depend on them), same image size,
same photos, same machine, one run. The book's predict(): PIL image -> Resize((256, 256)) + ToTensor +
Normalize -> model under torch.no_grad() -> softmax, one image at a time, fp32.
`catdog predict --batch-size 32`: decoding in threads overlapped with batched inference_mode forward passes,
channels_last, in fp32, bf16 and int8; and the same checkpoint exported with `catdog export classifier` and run by
ONNX Runtime (CPU, fp32) through the same predictor machinery (`catdog predict --model FILE.onnx`).

    python benchmarks/bench_predict.py [--images 96] [--arch resnet50] [--image-size 256]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "catdog"
sys.path.insert(0, str(REPO))


def photos(n: int) -> list[Path]:
    if (SHARED / "val").is_dir():
        found = sorted((SHARED / "val").rglob("*.jpg")) + sorted((SHARED / "train").rglob("*.jpg"))
        return found[:n]
    from catdog_glm.vision.synthetic import make_synthetic_dataset

    print(f"note: {SHARED} not found, using drawn 400 px images instead of photos")
    root = make_synthetic_dataset(tempfile.mkdtemp(), per_class=n // 2 + 1, image_size=400)
    return sorted(root.rglob("*.jpg"))[:n]


def make_checkpoint(arch: str, image_size: int) -> Path:
    import torch

    from catdog_glm.vision.checkpoint import save_checkpoint
    from catdog_glm.vision.model import build_model

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="bench-predict-")) / "best.pt"
    atexit.register(shutil.rmtree, path.parent, ignore_errors=True)  # ~100 MB per run otherwise left in /tmp
    save_checkpoint(
        path, arch=arch, classes=["cat", "dog"], model_state=build_model(arch, 2).state_dict(), image_size=image_size
    )
    # int8 needs calibration images, which `catdog train` stores in best.pt; here, the first photos.
    from catdog_glm.vision.checkpoint import update_checkpoint
    from catdog_glm.vision.transforms import load_resized

    update_checkpoint(path, calibration=torch.stack([load_resized(p, image_size) for p in photos(32)]))
    return path


def book_predictor(checkpoint: Path, image_size: int):
    """The book's page: a bare model and a predict(image) that handles one PIL image."""
    import torch
    from torchvision import transforms

    from catdog_glm.vision.checkpoint import build_model_from_checkpoint, load_checkpoint

    model = build_model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    transform = transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    classes = ["cat", "dog"]

    def predict(image):
        x = transform(image).unsqueeze(0)
        with torch.no_grad():
            probs = torch.nn.functional.softmax(model(x)[0], dim=0)
        return {classes[i]: float(probs[i]) for i in range(2)}

    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latency-runs", type=int, default=20)
    args = parser.parse_args()

    import torch
    from PIL import Image

    from catdog_glm.vision.export import export_classifier
    from catdog_glm.vision.predictor import Predictor, load_predictor

    files = photos(args.images)
    checkpoint = make_checkpoint(args.arch, args.image_size)
    print(
        f"bench_predict: {args.arch} {args.image_size}px, {len(files)} photos, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    book = book_predictor(checkpoint, args.image_size)
    book(Image.open(files[0]).convert("RGB"))  # warm-up
    started = time.perf_counter()
    for f in files:
        book(Image.open(f).convert("RGB"))
    book_tput = len(files) / (time.perf_counter() - started)
    book_lat = []
    for _ in range(args.latency_runs):
        t = time.perf_counter()
        book(Image.open(files[0]).convert("RGB"))
        book_lat.append(time.perf_counter() - t)

    def measure(predictor) -> tuple[float, float]:
        """(images/s over all the photos in batches, median single-image latency in seconds)."""
        list(predictor.predict_files(files[: args.batch_size], batch_size=args.batch_size))  # warm-up
        started = time.perf_counter()
        results = list(predictor.predict_files(files, batch_size=args.batch_size))
        throughput = len(files) / (time.perf_counter() - started)
        assert all(r.ok for r in results)
        latency = []
        for _ in range(args.latency_runs):
            t = time.perf_counter()
            predictor.predict_sources([files[0]])
            latency.append(time.perf_counter() - t)
        return throughput, statistics.median(latency)

    measured = {}
    for mode in ("fp32", "bf16", "int8"):
        measured[mode] = measure(Predictor.from_checkpoint(checkpoint, precision=mode))

    # The same checkpoint as ONNX, on ONNX Runtime's CPU provider (fp32 like the export).
    with tempfile.TemporaryDirectory(prefix="bench-predict-onnx-") as folder:
        export = export_classifier(checkpoint, Path(folder) / "model.onnx")
        measured["onnxruntime"] = measure(load_predictor(export.path, device="cpu"))

    # The whole CLI, process start and model load included.
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "catdog_glm",
            "predict",
            *map(str, files),
            "--checkpoint",
            str(checkpoint),
            "--batch-size",
            str(args.batch_size),
            "--precision",
            "int8",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    cli_seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr

    book_latency = statistics.median(book_lat)
    print(f"book predict() fp32        {book_tput:7.2f} images/s   latency median {book_latency * 1e3:6.1f} ms")
    for mode, (throughput, latency) in measured.items():
        name = "ONNX Runtime (CPU)" if mode == "onnxruntime" else f"catdog predictor {mode}"
        print(
            f"{name:26s} {throughput:7.2f} images/s   latency median {latency * 1e3:6.1f} ms   "
            f"ratio {throughput / book_tput:5.2f}x throughput, {book_latency / latency:5.2f}x latency"
        )
    onnx_tput, fp32_tput = measured["onnxruntime"][0], measured["fp32"][0]
    print(
        f"ONNX Runtime vs PyTorch fp32: {onnx_tput / fp32_tput:5.2f}x throughput "
        f"(export took {export.seconds:.1f} s, {export.bytes / 2**20:.0f} MiB)"
    )
    print(
        f"catdog predict CLI (int8)  {len(files) / cli_seconds:7.2f} images/s   (whole command: start, load, "
        f"calibrate, {len(files)} images: {cli_seconds:.1f} s)"
    )


if __name__ == "__main__":
    main()
