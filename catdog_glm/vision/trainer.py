"""Fine-tuning a torchvision classifier: the book's recipe, made fast, resumable and reproducible.

One call, `train(config, callbacks)`, does the whole run; the CLI only renders what the callbacks report.
Under torchrun it trains with DistributedDataParallel; only rank 0 logs, prints and saves.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from catdog_glm.config import TrainConfig
from catdog_glm.device import Precision, resolve_device, resolve_precision
from catdog_glm.errors import ConfigError, DataError
from catdog_glm.vision import checkpoint as ckpt_io
from catdog_glm.vision.data import discover, subsample
from catdog_glm.vision.evaluate import EvalResult, evaluate, run_model
from catdog_glm.vision.loader import ImageDataset, build_loader, cache_bytes, cache_fits
from catdog_glm.vision.model import build_model, load_pretrained, prepare_for_device
from catdog_glm.vision.plots import plot_confusion_matrix, plot_results
from catdog_glm.vision.quantize import CALIBRATION_IMAGES, fold_batchnorm, int8_supported, quantize_int8
from catdog_glm.vision.tracking import build_tracker
from catdog_glm.vision.transforms import IMAGENET_MEAN, IMAGENET_STD, build_augment

log = logging.getLogger(__name__)

RESULTS_FIELDS = ["epoch", "train_loss", "val_loss", "val_acc", "lr", "images_per_s", "epoch_seconds"]


class TrainCallbacks:
    """What the trainer reports while it works; the CLI draws progress bars from it. All no-ops here."""

    def on_start(self, info: dict) -> None: ...

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def on_step(self, loss: float, images: int) -> None: ...

    def on_validate_start(self, n_images: int) -> None: ...

    def on_validate_batch(self, images: int) -> None: ...

    def on_epoch_end(self, row: dict) -> None: ...

    def on_message(self, message: str) -> None: ...

    def on_prepare(self, description: str, total: int) -> None: ...

    def on_prepare_advance(self, n: int) -> None: ...


@dataclass
class TrainResult:
    output: Path
    best_path: Path
    last_path: Path
    classes: list[str]
    best_acc: float
    best_epoch: int
    test_acc: float
    test_loss: float
    epochs_run: int
    stopped_early: bool
    images_per_s: float
    seconds: float
    history: list[dict] = field(default_factory=list)
    corrupt_files: list[str] = field(default_factory=list)
    swanlab_logdir: Path | None = None
    confusion_matrix: list[list[int]] = field(default_factory=list)
    inference_accuracy: dict[str, float] = field(default_factory=dict)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_name: str) -> _Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(rank=rank, world=world, local_rank=local_rank)


def _resolve_workers(requested: int, device) -> int:
    if requested >= 0:
        return requested
    cpus = os.cpu_count() or 1
    # On a GPU the CPU only feeds it. On a CPU box the model needs every core: worker processes fight it for
    # them (measured here, 2 cores, ResNet50: 1 worker 7.4 images/s, none 16.3), and the RAM cache already
    # took decoding off the training loop.
    return min(8, cpus) if device.type == "cuda" else 0


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    import torch

    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }


def _restore_rng(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def _write_results_csv(path: Path, history: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=RESULTS_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row[k] for k in RESULTS_FIELDS})
    os.replace(tmp, path)


class _Run:
    """The state of one training run; `train()` below drives it."""

    def __init__(self, cfg: TrainConfig, callbacks: TrainCallbacks):
        import torch

        self.cfg, self.cb = cfg, callbacks
        self.dist = _setup_distributed(cfg.device)
        if self.dist.world > 1 and torch.cuda.is_available() and cfg.device in ("auto", "cuda"):
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = resolve_device(cfg.device)
        self.precision: Precision = resolve_precision(self.device, cfg.amp)
        self.output = Path(cfg.output)
        self.last_path, self.best_path = self.output / ckpt_io.LAST_NAME, self.output / ckpt_io.BEST_NAME

    # ---- set-up -------------------------------------------------------------------------------------------
    def check_output(self) -> None:
        # A process killed inside save_atomic leaves its temp file; the real checkpoints are intact.
        for stale in self.output.glob(".*.pt.*.tmp"):
            stale.unlink(missing_ok=True)
        if self.cfg.resume and not self.last_path.is_file():
            raise ConfigError(f"--resume: there is no {self.last_path} to continue from")
        if not self.cfg.resume and not self.cfg.overwrite and self.last_path.is_file():
            raise ConfigError(
                f"{self.output} already holds a run ({self.last_path.name}); pass --resume to "
                "continue it, --overwrite to start over, or another --output"
            )

    def build_data(self) -> None:
        cfg = self.cfg
        self.dataset = discover(cfg.data, val_split=cfg.val_split, seed=cfg.seed)
        self.classes = self.dataset.classes
        train = subsample(self.dataset.split("train"), cfg.train_limit, cfg.seed)
        val = subsample(self.dataset.split("val"), cfg.val_limit, cfg.seed)
        if not train:
            raise DataError(f"the training split of {cfg.data} is empty")
        total = len(train) + len(val)
        if cfg.cache == "none":
            use_cache, note = False, "off"
        elif cache_fits(total, cfg.image_size):
            use_cache, note = True, f"RAM ({cache_bytes(total, cfg.image_size) / 2**20:.0f} MiB)"
        else:
            use_cache = False
            note = (
                f"off: {total} images at {cfg.image_size}px need "
                f"{cache_bytes(total, cfg.image_size) / 2**30:.1f} GiB, more than half the free memory"
            )
            self.cb.on_message(f"RAM cache {note}; training without it")
        self.cache_note = note
        augment = build_augment(cfg.image_size) if cfg.augment else None
        self.train_ds = ImageDataset(
            train, cfg.image_size, cache=use_cache, augment=augment, seed=cfg.seed, substitute_corrupt=True
        )
        self.val_ds = ImageDataset(val, cfg.image_size, cache=use_cache)
        self.workers = _resolve_workers(cfg.workers, self.device)

        from torch.utils.data import DistributedSampler, Subset

        # DistributedSampler also serves one process: a per-epoch, seed-determined order (exact resume).
        self.sampler = DistributedSampler(
            self.train_ds, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=cfg.seed
        )
        pin = self.device.type == "cuda"
        # A last batch of one image would break BatchNorm in training mode: drop it (it is reshuffled in later).
        lone_last = len(self.sampler) % cfg.batch_size == 1
        self.train_loader = build_loader(
            self.train_ds,
            batch_size=cfg.batch_size,
            shuffle=False,
            workers=self.workers,
            sampler=self.sampler,
            pin_memory=pin,
            drop_last=lone_last,
        )
        # Each rank validates a disjoint strided shard; the confusion matrices are summed.
        val_part = Subset(self.val_ds, range(self.dist.rank, len(self.val_ds), self.dist.world))
        self.val_loader = build_loader(
            val_part, batch_size=max(cfg.batch_size, 32), shuffle=False, workers=self.workers, pin_memory=pin
        )

    def fill_caches(self) -> None:
        datasets = [ds for ds in (self.train_ds, self.val_ds) if ds.cache is not None]
        if not datasets:
            return
        self.cb.on_prepare("decoding into RAM cache", sum(len(ds) for ds in datasets))
        for ds in datasets:
            ds.fill_cache(threads=min(8, os.cpu_count() or 1), on_progress=self.cb.on_prepare_advance)

    def build_model(self) -> None:
        import torch

        cfg = self.cfg
        model = build_model(cfg.arch, len(self.classes))
        self.pretrained_note = "from checkpoint" if cfg.resume else load_pretrained(model, cfg.arch, cfg.pretrained)
        self.model = prepare_for_device(model, self.device, cfg.channels_last)
        self.ddp_model = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        fused = self.device.type in ("cpu", "cuda")  # the fused Adam kernel is the fastest on both
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=fused)
        # Closed-form cosine (not CosineAnnealingLR's recursive one): resuming with a larger --epochs
        # stretches the curve instead of restarting the decay from a near-zero learning rate.
        epochs = cfg.epochs
        factor = (
            (lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs)))
            if cfg.schedule == "cosine"
            else (lambda e: 1.0)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_grad_scaler)
        self.start_epoch, self.step = 0, 0
        self.best_acc, self.best_epoch, self.bad_epochs = -1.0, 0, 0
        self.history: list[dict] = []

    def resume(self) -> None:
        saved = ckpt_io.load_checkpoint(self.last_path)
        state = saved.raw.get("training_state")
        if state is None:
            raise ConfigError(f"{self.last_path} has no training state to resume from")
        if saved.arch != self.cfg.arch or saved.classes != self.classes:
            raise ConfigError(
                f"--resume: {self.last_path} is a {saved.arch} over {saved.classes}, but this run "
                f"asks for {self.cfg.arch} over {self.classes}; use the same --arch and --data"
            )
        self.model.load_state_dict(saved.model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_acc, self.best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.history = list(state["history"])
        _restore_rng(state["rng"])
        self.cb.on_message(f"resumed from {self.last_path} at epoch {self.start_epoch + 1}")

    # ---- the loop -----------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[float, float]:
        import torch.nn.functional as F

        cfg = self.cfg
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        self.ddp_model.train()
        loss_sum, seen, started = 0.0, 0, time.perf_counter()
        self.cb.on_epoch_start(epoch, cfg.epochs, len(self.train_loader))
        for batch in self.train_loader:
            if batch is None:  # every file of this batch was unreadable
                self.cb.on_step(float("nan"), 0)
                continue
            images, labels, _ = batch
            labels = labels.to(self.device, non_blocking=True)
            logits = run_model(self.ddp_model, images, self.device, self.precision, cfg.channels_last)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            value = float(loss.detach())
            loss_sum += value * len(labels)
            seen += len(labels)
            self.step += 1
            if self.dist.main:
                self.tracker.log({"train_loss": value}, step=self.step)
            self.cb.on_step(value, len(labels))
        return loss_sum / max(seen, 1), seen / max(time.perf_counter() - started, 1e-9)

    def validate(self, keep_predictions: bool = False):
        import torch
        import torch.distributed as dist

        self.cb.on_validate_start(len(self.val_ds) // self.dist.world)
        out = evaluate(
            self.model,
            self.val_loader,
            classes=self.classes,
            device=self.device,
            precision=self.precision,
            channels_last=self.cfg.channels_last,
            on_batch=self.cb.on_validate_batch,
            keep_predictions=keep_predictions,
        )
        result, predictions = out if keep_predictions else (out, [])
        if self.dist.world > 1:
            packed = torch.cat([result.confusion.flatten().double(), torch.tensor([result.loss_sum])])
            packed = packed.to(self.device)
            dist.all_reduce(packed)
            k = len(self.classes)
            packed = packed.cpu()
            result = EvalResult(
                loss_sum=float(packed[-1]), confusion=packed[:-1].round().long().view(k, k), classes=self.classes
            )
        return result, predictions

    def checkpoint_fields(self, metrics: dict, epoch: int) -> dict:
        return dict(
            arch=self.cfg.arch,
            classes=self.classes,
            model_state=self.model.state_dict(),
            image_size=self.cfg.image_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            config=self.cfg.to_dict(),
            metrics=metrics,
            epoch=epoch,
            # Where the data was, so `catdog eval` recognizes the run's own dataset from any working directory.
            dataset={"root": str(self.dataset.root.resolve()), "layout": self.dataset.layout},
        )

    def save(self, epoch: int, row: dict, improved: bool) -> None:
        metrics = {
            "val_acc": row["val_acc"],
            "val_loss": row["val_loss"],
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
        }
        if improved:
            ckpt_io.save_checkpoint(self.best_path, **self.checkpoint_fields(metrics, epoch + 1))
        training_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch + 1,
            "step": self.step,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "rng": _rng_state(),
        }
        ckpt_io.save_checkpoint(
            self.last_path, **self.checkpoint_fields(metrics, epoch + 1), training_state=training_state
        )
        _write_results_csv(self.output / "results.csv", self.history)

    def finish(self, started: float, stopped_early: bool) -> TrainResult:
        """Re-evaluate the best weights on the validation set: test_acc/test_loss, pictures, captioned images."""
        best = ckpt_io.load_checkpoint(self.best_path) if self.best_path.is_file() else None
        if best is not None:
            self.model.load_state_dict(best.model_state)
        result, predictions = self.validate(keep_predictions=True)
        corrupt = sorted(set(self.train_ds.corrupt_files()) | set(self.val_ds.corrupt_files()))
        inference: dict[str, float] = {}
        if self.dist.main:
            self.tracker.log({"test_acc": result.accuracy, "test_loss": result.loss}, step=self.step)
            self.log_val_images(predictions)
            plot_confusion_matrix(
                result.confusion,
                self.classes,
                self.output / "confusion_matrix.png",
                title=f"{self.cfg.arch} validation (acc {result.accuracy:.1%})",
            )
            if self.history:
                plot_results(self.history, self.output / "results.png")
            if self.cfg.int8 and best is not None:
                inference, calibration = self.inference_accuracy()
                self.tracker.log(inference, step=self.step)
                ckpt_io.update_checkpoint(self.best_path, metrics=inference, calibration=calibration)
            self.tracker.finish()
        speeds = [r["images_per_s"] for r in self.history]
        return TrainResult(
            output=self.output,
            best_path=self.best_path,
            last_path=self.last_path,
            classes=self.classes,
            best_acc=self.best_acc,
            best_epoch=self.best_epoch,
            test_acc=result.accuracy,
            test_loss=result.loss,
            epochs_run=len(self.history),
            stopped_early=stopped_early,
            images_per_s=sorted(speeds)[len(speeds) // 2] if speeds else 0.0,
            seconds=time.perf_counter() - started,
            history=self.history,
            corrupt_files=corrupt,
            swanlab_logdir=self.tracker.logdir,
            inference_accuracy=inference,
            confusion_matrix=result.confusion.tolist(),
        )

    def calibration_images(self):
        """Up to CALIBRATION_IMAGES readable training images (uint8), a seeded class-balanced pick."""
        import torch

        from catdog_glm.vision.data import subsample

        wanted = {s.path for s in subsample(self.train_ds.samples, CALIBRATION_IMAGES, self.cfg.seed)}
        images = [self.train_ds.load(i) for i, s in enumerate(self.train_ds.samples) if s.path in wanted]
        images = [im for im in images if im is not None]
        return torch.stack(images).clone() if images else None

    def inference_accuracy(self):
        """Validation accuracy of the best model on the CPU in fp32, bf16 (native only) and int8.

        Predictors use bf16 and int8 by default only where these stay within half a point of fp32.
        """
        import torch

        from catdog_glm.device import cpu_supports_bf16

        cpu = torch.device("cpu")
        model = fold_batchnorm(self.model.cpu().eval())
        loader = build_loader(self.val_ds, batch_size=32, shuffle=False, workers=0)

        def accuracy(m, precision: Precision, channels_last: bool = True) -> float:
            return evaluate(
                m, loader, classes=self.classes, device=cpu, precision=precision, channels_last=channels_last
            ).accuracy

        self.cb.on_message("checking fp32 / bf16 / int8 validation accuracy on the CPU")
        metrics = {"val_acc_fp32": accuracy(model, Precision(None, False))}
        if cpu_supports_bf16():
            metrics["val_acc_bf16"] = accuracy(model, Precision(torch.bfloat16, False))
        calibration = self.calibration_images()
        if calibration is not None and int8_supported():
            try:
                quantized = quantize_int8(self.model, calibration, IMAGENET_MEAN, IMAGENET_STD)
                metrics["val_acc_int8"] = accuracy(quantized, Precision(None, False), channels_last=False)
            except Exception as e:  # an architecture FX cannot quantize keeps fp32/bf16
                log.warning("int8 quantization of %s failed (%s); int8 inference is off for it", self.cfg.arch, e)
        self.model.to(self.device)
        return metrics, calibration

    def log_val_images(self, predictions) -> None:
        from torchvision.transforms.functional import to_pil_image

        images, captions = [], []
        for index, probs in predictions[: self.cfg.log_images]:
            p = int(probs.argmax())
            truth = self.classes[self.val_ds.samples[index].label]
            images.append(to_pil_image(self.val_ds.load(index)))
            captions.append(f"pred {self.classes[p]} ({float(probs[p]):.0%}), true {truth}")
        if images:
            self.tracker.log_images("val_predictions", images, captions, step=self.step)


def train(cfg: TrainConfig, callbacks: TrainCallbacks | None = None) -> TrainResult | None:
    """Run a whole training job as `cfg` describes and return its results (None on torchrun ranks > 0)."""
    cfg.validate()
    cb = callbacks or TrainCallbacks()
    run = _Run(cfg, cb)
    if not run.dist.main:
        cb = run.cb = TrainCallbacks()  # only rank 0 prints
    run.check_output()
    _seed_everything(cfg.seed)
    run.build_data()
    run.build_model()
    if cfg.resume:
        run.resume()
    if run.dist.main:
        run.output.mkdir(parents=True, exist_ok=True)
        (run.output / "args.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        experiment = cfg.experiment or f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
        run.tracker = build_tracker(
            cfg.tracker,
            mode=cfg.swanlab_mode,
            logdir=run.output / "swanlog",
            project=cfg.project,
            experiment=experiment,
            description=cfg.description,
            config=cfg.to_dict(),
        )
    else:
        from catdog_glm.vision.tracking import Tracker

        run.tracker = Tracker()
    cb.on_start(
        {
            "data": str(run.dataset.root),
            "layout": run.dataset.layout,
            "classes": run.classes,
            "train_images": len(run.train_ds),
            "val_images": len(run.val_ds),
            "device": str(run.device),
            "precision": run.precision.name,
            "channels_last": cfg.channels_last,
            "cache": run.cache_note,
            "workers": run.workers,
            "pretrained": run.pretrained_note,
            "world_size": run.dist.world,
            "arch": cfg.arch,
            "start_epoch": run.start_epoch,
        }
    )
    run.fill_caches()
    started = time.perf_counter()
    stopped_early = False
    for epoch in range(run.start_epoch, cfg.epochs):
        epoch_started = time.perf_counter()
        train_loss, speed = run.train_epoch(epoch)
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        val, _ = run.validate()
        improved = val.accuracy > run.best_acc
        if improved:
            run.best_acc, run.best_epoch, run.bad_epochs = val.accuracy, epoch + 1, 0
        else:
            run.bad_epochs += 1
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 6),
            "val_loss": round(val.loss, 6),
            "val_acc": round(val.accuracy, 6),
            "lr": lr,
            "images_per_s": round(speed, 3),
            "epoch_seconds": round(time.perf_counter() - epoch_started, 2),
        }
        run.history.append(row)
        if run.dist.main:
            run.tracker.log(
                {"val_loss": val.loss, "val_acc": val.accuracy, "lr": lr, "epoch": epoch + 1}, step=run.step
            )
            run.save(epoch, row, improved)
        cb.on_epoch_end(row)
        if cfg.patience and run.bad_epochs >= cfg.patience and epoch + 1 < cfg.epochs:
            stopped_early = True
            cb.on_message(f"early stopping: no better val accuracy for {cfg.patience} epochs")
            break
    if run.dist.world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written best.pt before anyone reloads it
    result = run.finish(started, stopped_early)
    if run.dist.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result if run.dist.main else None
