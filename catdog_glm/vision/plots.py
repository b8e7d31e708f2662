"""Pictures people would rather look at than tables: training curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(confusion, classes: list[str], path: str | Path, title: str = "Confusion matrix") -> Path:
    plt = _pyplot()
    cm = confusion.tolist() if hasattr(confusion, "tolist") else confusion
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * k, 1.2 + 1.1 * k), dpi=120)
    peak = max(max(row) for row in cm) or 1
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=peak)
    for i in range(k):
        total = sum(cm[i]) or 1
        for j in range(k):
            color = "white" if cm[i][j] > peak / 2 else "black"
            ax.text(j, i, f"{cm[i][j]}\n{cm[i][j] / total:.0%}", ha="center", va="center", color=color)
    ax.set_xticks(range(k), classes)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_results(rows: list[dict], path: str | Path) -> Path:
    """Loss and accuracy per epoch (from results.csv rows) as results.png."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["val_acc"] for r in rows], "o-", color="tab:green", label="val accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylim(0, 1.01)
    ax_acc.set_title("validation accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
