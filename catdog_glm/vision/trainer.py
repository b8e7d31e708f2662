"""Fine-tuning a classifier: the book's recipe, made fast, resumable and reproducible.

One call, `train(config, callbacks)`, does the whole run; the CLI only renders what the callbacks report.
The parts, after timm: `build_data` and `build_state` set up, `train_one_epoch` and `validate` (train_loop.py) are
the loop, `CheckpointSaver` (saver.py) owns best.pt/last.pt, `TrainState.state_dict()` is what last.pt keeps to
resume, `calibrate` (calibration.py) is the step after training (--no-calibrate skips it), results.py writes
results.csv and rng.py seeds, saves and restores the RNG. Under torchrun (distributed.py) it trains with
DistributedDataParallel; only rank 0 logs, prints and saves. Whatever
ends a run (the last epoch, an error, Ctrl-C), the tracker, the process group and the callbacks are closed and the
run folder holds a readable last.pt and no temp files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from catdog_glm.config import TrainConfig
from catdog_glm.device import Precision, resolve_precision
from catdog_glm.errors import CatdogError, ConfigError, DataError
from catdog_glm.vision.calibration import calibrate
from catdog_glm.vision.checkpoint import LAST_NAME, ClassifierCheckpoint, load_checkpoint
from catdog_glm.vision.data import Dataset, discover, subsample
from catdog_glm.vision.distributed import DistInfo, barrier, leave_distributed, rank_device, setup_distributed
from catdog_glm.vision.evaluate import InferenceSpec
from catdog_glm.vision.loader import ImageDataset, build_loader, cache_bytes, cache_fits
from catdog_glm.vision.model import build_model, load_pretrained, prepare_for_device
from catdog_glm.vision.plots import plot_confusion_matrix, plot_results
from catdog_glm.vision.results import RESULTS_NAME, epoch_row, write_results_csv
from catdog_glm.vision.rng import restore_rng, rng_state, seed_everything
from catdog_glm.vision.saver import CheckpointSaver
from catdog_glm.vision.state_dict import remove_stale_temp_files
from catdog_glm.vision.tracking import Tracker, build_tracker
from catdog_glm.vision.train_loop import train_one_epoch, validate
from catdog_glm.vision.transforms import BatchMixer, TrainAugment, normalization_for

log = logging.getLogger(__name__)


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

    def on_close(self) -> None:
        """Called last, however the run ended: stop progress bars here."""


class RunComplete(CatdogError):
    """`--resume` on a run that has already trained every epoch asked of it; the message says how to extend it."""


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


# ---- processes, files ---------------------------------------------------------------------------------------
def _resolve_workers(requested: int, device) -> int:
    if requested >= 0:
        return requested
    cpus = os.cpu_count() or 1
    # On a GPU the CPU only feeds it. On a CPU box the model needs every core: worker processes fight it for
    # them (measured here, 2 cores, ResNet50: 1 worker 7.4 images/s, none 16.3), and the RAM cache already
    # took decoding off the training loop.
    return min(8, cpus) if device.type == "cuda" else 0


def _open_run(cfg: TrainConfig, output: Path) -> ClassifierCheckpoint | None:
    """Check what `output` holds against --resume/--overwrite; the run's last.pt when resuming."""
    remove_stale_temp_files(output)  # a SIGKILL inside an atomic write leaves one; the real files are intact
    last_path = output / LAST_NAME
    if cfg.resume and not last_path.is_file():
        raise ConfigError(f"--resume: there is no {last_path} to continue from")
    if not cfg.resume:
        if not cfg.overwrite and last_path.is_file():
            raise ConfigError(
                f"{output} already holds a run ({last_path.name}); pass --resume to "
                "continue it, --overwrite to start over, or another --output"
            )
        return None
    saved = load_checkpoint(last_path)
    state = saved.raw.get("training_state")
    if state is None:
        raise ConfigError(f"{last_path} has no training state to resume from")
    done, planned = int(state["epoch"]), int(state.get("epochs", state["epoch"]))
    best = f"best val accuracy {float(state['best_acc']):.2%} at epoch {int(state['best_epoch'])}"
    if done >= cfg.epochs:
        raise RunComplete(
            f"{output} is complete: it trained all {done} epochs ({best}); to train it further, "
            f"pass --resume --epochs N with N > {done}"
        )
    if state.get("stopped_early") and cfg.epochs <= planned:
        raise RunComplete(
            f"{output} is complete: it stopped early after {done} of {planned} epochs ({best}); to train it "
            f"further, pass --resume --epochs N with N > {planned}"
        )
    return saved


def saved_run_config(output: str | Path) -> dict | None:
    """The config the run in `output` was started with (from its last.pt), or None when there is no run there."""
    last_path = Path(output) / LAST_NAME
    return load_checkpoint(last_path).config if last_path.is_file() else None


# ---- set-up ---------------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    dataset: Dataset
    train_ds: ImageDataset
    val_ds: ImageDataset
    sampler: object
    train_loader: object
    val_loader: object
    workers: int
    cache_note: str

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes


def build_data(cfg: TrainConfig, d: DistInfo, device, on_message: Callable[[str], None]) -> TrainData:
    """The dataset's train and val splits as datasets (RAM-cached where they fit) and their loaders."""
    from torch.utils.data import DistributedSampler, Subset

    dataset = discover(cfg.data, val_split=cfg.val_split, seed=cfg.seed)
    train = subsample(dataset.split("train"), cfg.train_limit, cfg.seed)
    val = subsample(dataset.split("val"), cfg.val_limit, cfg.seed)
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
        on_message(f"RAM cache {note}; training without it")
    augment = TrainAugment.from_config(cfg)
    train_ds = ImageDataset(
        train, cfg.image_size, cache=use_cache, augment=augment, seed=cfg.seed, substitute_corrupt=True
    )
    val_ds = ImageDataset(val, cfg.image_size, cache=use_cache)
    workers = _resolve_workers(cfg.workers, device)
    # DistributedSampler also serves one process: a per-epoch, seed-determined order (exact resume).
    sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    pin = device.type == "cuda"
    # A last batch of one image would break BatchNorm in training mode: drop it (it is reshuffled in later).
    lone_last = len(sampler) % cfg.batch_size == 1
    train_loader = build_loader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=False,
        workers=workers,
        sampler=sampler,
        pin_memory=pin,
        drop_last=lone_last,
    )
    # Each rank validates a disjoint strided shard; the confusion matrices are summed.
    val_part = Subset(val_ds, range(d.rank, len(val_ds), d.world))
    val_loader = build_loader(
        val_part, batch_size=max(cfg.batch_size, 32), shuffle=False, workers=workers, pin_memory=pin
    )
    return TrainData(dataset, train_ds, val_ds, sampler, train_loader, val_loader, workers, note)


def fill_caches(data: TrainData, callbacks: TrainCallbacks) -> None:
    datasets = [ds for ds in (data.train_ds, data.val_ds) if ds.cache is not None]
    if not datasets:
        return
    callbacks.on_prepare("decoding into RAM cache", sum(len(ds) for ds in datasets))
    for ds in datasets:
        ds.fill_cache(threads=min(8, os.cpu_count() or 1), on_progress=callbacks.on_prepare_advance)


@dataclass
class TrainState:
    """Everything the loop changes: weights, optimizer, schedule, scaler, position and history. `state_dict()` is
    last.pt's `training_state` (with the process's RNG); `load_state_dict()` puts a saved one back (see `_resume`)."""

    model: object
    ddp_model: object  # the model itself, or its DistributedDataParallel wrapper
    optimizer: object
    scheduler: object
    scaler: object
    lr_factor: Callable[[int], float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrained_note: str
    ema: object = None  # timm ModelEmaV3 when --ema: its weights are the ones validated and saved
    mixer: object = None  # transforms.BatchMixer when --mixup/--cutmix
    epochs: int = 1  # planned: the run trains epochs [epoch, epochs)
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)

    @property
    def eval_model(self):
        """The weights the run validates and saves: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        """What resuming needs besides the saved weights (last.pt's `model`, which is `eval_model`'s): optimizer,
        schedule, scaler, position, history, the process's RNG and, with --ema, the weights being trained."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "epochs": self.epochs,
            "stopped_early": self.stopped_early,
            "step": self.step,
            "history": self.history,
            "rng": rng_state(),
        }
        if self.ema is not None:
            state["raw_model"] = self.model.state_dict()
        return state

    def load_state_dict(self, state: dict, weights: dict) -> None:
        """Continue from `state` (a `state_dict()`) and the saved `weights`. Raises ValueError when the optimizer
        state does not fit this optimizer. With a larger planned `epochs` than the saved run's, the next epoch's
        learning rate comes from the stretched schedule, not the old one's end."""
        raw = state.get("raw_model")  # with --ema, `weights` are the average and this the weights being trained
        self.model.load_state_dict(raw if raw is not None else weights)
        if self.ema is not None:
            self.ema.module.load_state_dict(weights if raw is not None else self.model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])  # ValueError: e.g. Adam's one group against AdamW's two
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.stopped_early = bool(state.get("stopped_early", False))
        self.history = list(state["history"])
        restore_rng(state["rng"])
        if self.epochs != int(state.get("epochs", self.epochs)):
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
                group["lr"] = base * self.lr_factor(self.scheduler.last_epoch)


def _decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: no weight decay on norm weights and biases (1-d tensors), as timm and most recipes."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_schedule(schedule: str, epochs: int, warmup_epochs: int = 0) -> Callable[[int], float]:
    """The learning-rate factor of each epoch: a linear warmup over `warmup_epochs`, then cosine decay over the rest
    (closed form, not CosineAnnealingLR's recursive one: resuming with a larger --epochs stretches the curve instead
    of restarting the decay from a near-zero rate) or constant, as in the book."""

    def factor(e: int) -> float:
        if e < warmup_epochs:
            return (e + 1) / (warmup_epochs + 1)
        if schedule != "cosine":
            return 1.0
        span = max(1, epochs - warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * min(e - warmup_epochs, span) / span))

    return factor


def build_state(cfg: TrainConfig, num_classes: int, device, precision: Precision, d: DistInfo) -> TrainState:
    """The model (start weights loaded unless resuming), the optimizer, the learning-rate schedule, the grad
    scaler, and the weight average and batch mixer where the recipe asks for them."""
    import torch

    model = build_model(cfg.arch, num_classes)
    mean, std = normalization_for(cfg.arch)  # what its weights expect; recorded in checkpoints
    note = "from checkpoint" if cfg.resume else load_pretrained(model, cfg.arch, cfg.pretrained)
    model = prepare_for_device(model, device, cfg.channels_last)
    fused = device.type in ("cpu", "cuda")  # the fused Adam kernels are the fastest on both
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(_decay_groups(model, cfg.weight_decay), lr=cfg.lr, fused=fused)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    factor = lr_schedule(cfg.schedule, cfg.epochs, cfg.warmup_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)
    ema = None
    if cfg.ema:
        from timm.utils.model_ema import ModelEmaV3

        # Warmup: the decay grows with the step count toward cfg.ema, so short runs average over their own steps
        # rather than stay near the random start. Made before the DDP wrapper, as timm advises.
        ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True, warmup_power=0.75)
    ddp_model = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mixer = None
    if cfg.mixup or cfg.cutmix:
        mixer = BatchMixer(num_classes, mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mix_prob)
    return TrainState(
        model, ddp_model, optimizer, scheduler, scaler, factor, mean, std, note, ema, mixer, epochs=cfg.epochs
    )


def _resume(saved: ClassifierCheckpoint, state: TrainState, saver: CheckpointSaver, cfg: TrainConfig, classes) -> str:
    """Continue from last.pt: weights, optimizer, schedule, scaler, position, score, history and RNG."""
    if saved.arch != cfg.arch or saved.classes != classes:
        raise ConfigError(
            f"--resume: {saver.last_path} is a {saved.arch} over {saved.classes}, but this run "
            f"asks for {cfg.arch} over {classes}; use the same --arch and --data"
        )
    ts = saved.raw["training_state"]
    planned = int(ts.get("epochs", cfg.epochs))
    try:
        state.load_state_dict(ts, saved.model_state)
    except ValueError as e:  # e.g. Adam's one parameter group against AdamW's two
        raise ConfigError(
            f"--resume: the optimizer state in {saver.last_path} does not fit --optimizer {cfg.optimizer} ({e}); "
            "resume with the options the run was started with"
        ) from e
    saver.load_state_dict(ts)
    if state.stopped_early and cfg.epochs != planned:
        state.stopped_early = False
        saver.bad_epochs = 0  # asked for more epochs: early stopping counts afresh
    return f"resumed from {saver.last_path} at epoch {state.epoch + 1}"


def _start_tracker(cfg: TrainConfig, output: Path) -> Tracker:
    experiment = cfg.experiment or f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    return build_tracker(
        cfg.tracker,
        mode=cfg.swanlab_mode,
        logdir=output / "swanlog",
        project=cfg.project,
        experiment=experiment,
        description=cfg.description,
        config=cfg.to_dict(),
    )


# ---- the run --------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What one run's steps share; `train()` builds it and each step reads it."""

    cfg: TrainConfig
    d: DistInfo
    device: object
    precision: Precision
    data: TrainData
    state: TrainState
    saver: CheckpointSaver
    tracker: Tracker
    cb: TrainCallbacks

    @property
    def spec(self) -> InferenceSpec:
        """How this rank runs the model: per-epoch validation scores without test-time flip (it only tracks
        progress, and would cost twice the time); the final score flips as --tta says."""
        return InferenceSpec(self.device, self.precision, self.cfg.channels_last, self.state.mean, self.state.std)

    def validate(self, model, keep_predictions: bool = False, tta: bool = False):
        self.cb.on_validate_start(len(self.data.val_ds) // self.d.world)
        return validate(
            model,
            self.data.val_loader,
            classes=self.data.classes,
            spec=self.spec.replace(tta=tta),
            world_size=self.d.world,
            on_batch=self.cb.on_validate_batch,
            keep_predictions=keep_predictions,
        )


def _fit(run: _Run) -> bool:
    """The epochs from where the run stands to cfg.epochs; True when early stopping ended them."""
    cfg, state, saver, data = run.cfg, run.state, run.saver, run.data

    def on_step(loss: float, images: int) -> None:
        if images:
            state.step += 1
            run.tracker.log({"train_loss": loss}, step=state.step)
        run.cb.on_step(loss, images)

    for epoch in range(state.epoch, cfg.epochs):
        epoch_started = time.perf_counter()
        data.sampler.set_epoch(epoch)
        data.train_ds.set_epoch(epoch)
        run.cb.on_epoch_start(epoch, cfg.epochs, len(data.train_loader))
        stats = train_one_epoch(
            state.ddp_model,
            data.train_loader,
            state.optimizer,
            state.scaler,
            run.spec,
            mixer=state.mixer,
            label_smoothing=cfg.label_smoothing,
            ema=state.ema,
            step=state.step,
            on_step=on_step,
        )
        lr = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step()
        val, _ = run.validate(state.eval_model)
        improved = saver.observe(val.accuracy, epoch + 1)
        row = epoch_row(
            epoch + 1,
            train_loss=stats.loss,
            val_loss=val.loss,
            val_acc=val.accuracy,
            lr=lr,
            images_per_s=stats.images_per_s,
            seconds=time.perf_counter() - epoch_started,
        )
        state.history.append(row)
        state.epoch = epoch + 1
        state.stopped_early = bool(cfg.patience) and saver.bad_epochs >= cfg.patience and epoch + 1 < cfg.epochs
        run.tracker.log({"val_loss": val.loss, "val_acc": val.accuracy, "lr": lr, "epoch": epoch + 1}, step=state.step)
        saver.save(
            state.eval_model,
            epoch=epoch + 1,
            metrics={"val_acc": row["val_acc"], "val_loss": row["val_loss"]},
            improved=improved,
            training_state={**state.state_dict(), **saver.state_dict()},
        )
        if run.d.main:
            write_results_csv(saver.folder / RESULTS_NAME, state.history)
        run.cb.on_epoch_end(row)
        if state.stopped_early:
            run.cb.on_message(f"early stopping: no better val accuracy for {cfg.patience} epochs")
            return True
    return False


def _finish(run: _Run, started: float, stopped_early: bool) -> TrainResult:
    """Re-evaluate the best weights on the validation set (test_acc/test_loss), draw the pictures, log captioned
    images, then calibrate int8 and record the CPU inference accuracies in best.pt."""
    cfg, state, saver, data = run.cfg, run.state, run.saver, run.data
    best = saver.best_weights()
    if best is not None:
        state.model.load_state_dict(best)
    # With --tta the final score (test_acc, and what eval and predict will do) averages each image and its mirror
    # image; the per-epoch validation does not, as it only tracks progress and would cost twice the time.
    result, predictions = run.validate(state.model, keep_predictions=True, tta=cfg.tta)
    corrupt = sorted(set(data.train_ds.corrupt_files()) | set(data.val_ds.corrupt_files()))
    inference: dict[str, float] = {}
    if run.d.main:
        run.tracker.log({"test_acc": result.accuracy, "test_loss": result.loss}, step=state.step)
        _log_val_images(run, predictions)
        plot_confusion_matrix(
            result.confusion,
            data.classes,
            saver.folder / "confusion_matrix.png",
            title=f"{cfg.arch} validation (acc {result.accuracy:.1%})",
        )
        if state.history:
            plot_results(state.history, saver.folder / "results.png")
        if cfg.int8 and best is not None:
            run.cb.on_message("checking fp32 / bf16 / int8 validation accuracy on the CPU (--no-calibrate skips this)")
            model = build_model(cfg.arch, len(data.classes))
            model.load_state_dict(best)
            inference, calibration = calibrate(
                model,
                train_ds=data.train_ds,
                val_ds=data.val_ds,
                classes=data.classes,
                spec=run.spec.replace(tta=cfg.tta),
                seed=cfg.seed,
                arch=cfg.arch,
            )
            run.tracker.log(inference, step=state.step)
            saver.add_to_best(metrics=inference, calibration=calibration)
    speeds = [r["images_per_s"] for r in state.history]
    return TrainResult(
        output=saver.folder,
        best_path=saver.best_path,
        last_path=saver.last_path,
        classes=data.classes,
        best_acc=saver.best_acc,
        best_epoch=saver.best_epoch,
        test_acc=result.accuracy,
        test_loss=result.loss,
        epochs_run=len(state.history),
        stopped_early=stopped_early,
        images_per_s=sorted(speeds)[len(speeds) // 2] if speeds else 0.0,
        seconds=time.perf_counter() - started,
        history=state.history,
        corrupt_files=corrupt,
        swanlab_logdir=run.tracker.logdir,
        inference_accuracy=inference,
        confusion_matrix=result.confusion.tolist(),
    )


def _log_val_images(run: _Run, predictions) -> None:
    from torchvision.transforms.functional import to_pil_image

    classes, val_ds = run.data.classes, run.data.val_ds
    images, captions = [], []
    for index, probs in predictions[: run.cfg.log_images]:
        p = int(probs.argmax())
        truth = classes[val_ds.samples[index].label]
        images.append(to_pil_image(val_ds.load(index)))
        captions.append(f"pred {classes[p]} ({float(probs[p]):.0%}), true {truth}")
    if images:
        run.tracker.log_images("val_predictions", images, captions, step=run.state.step)


def train(cfg: TrainConfig, callbacks: TrainCallbacks | None = None) -> TrainResult | None:
    """Run a whole training job as `cfg` describes and return its results (None on torchrun ranks > 0).

    Raises RunComplete when `cfg.resume` names a run that has already trained `cfg.epochs` epochs.
    """
    cfg.validate()
    shown = callbacks or TrainCallbacks()
    d = setup_distributed(cfg.device)
    cb = shown if d.main else TrainCallbacks()  # only rank 0 prints
    tracker, outcome = Tracker(), "crashed"
    try:
        device = rank_device(cfg.device, d)
        precision = resolve_precision(device, cfg.precision)
        output = Path(cfg.output)
        saved = _open_run(cfg, output)
        seed_everything(cfg.seed)
        data = build_data(cfg, d, device, cb.on_message)
        state = build_state(cfg, len(data.classes), device, precision, d)
        meta = dict(
            arch=cfg.arch,
            classes=data.classes,
            image_size=cfg.image_size,
            mean=state.mean,
            std=state.std,
            config=cfg.to_dict(),
            # Where the data was, so `catdog eval` recognizes the run's own dataset from any working directory.
            dataset={"root": str(data.dataset.root.resolve()), "layout": data.dataset.layout},
        )
        saver = CheckpointSaver(output, meta, write=d.main)
        resumed = _resume(saved, state, saver, cfg, data.classes) if saved is not None else None
        if d.main:
            output.mkdir(parents=True, exist_ok=True)
            (output / "args.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
            tracker = _start_tracker(cfg, output)
        run = _Run(cfg, d, device, precision, data, state, saver, tracker, cb)
        cb.on_start(
            {
                "data": str(data.dataset.root),
                "layout": data.dataset.layout,
                "classes": data.classes,
                "train_images": len(data.train_ds),
                "val_images": len(data.val_ds),
                "device": str(device),
                "precision": precision.name,
                "channels_last": cfg.channels_last,
                "cache": data.cache_note,
                "workers": data.workers,
                "pretrained": state.pretrained_note,
                "world_size": d.world,
                "arch": cfg.arch,
                "recipe": cfg.recipe,
                "start_epoch": state.epoch,
            }
        )
        if resumed:
            cb.on_message(resumed)
        fill_caches(data, cb)
        started = time.perf_counter()
        stopped_early = _fit(run)
        barrier(d)  # rank 0 has written best.pt before anyone reads it
        result = _finish(run, started, stopped_early)
        outcome = "success"
        return result if d.main else None
    except KeyboardInterrupt:
        outcome = "aborted"
        raise
    finally:
        tracker.finish(state=outcome)
        leave_distributed(d)
        cb.on_close()
