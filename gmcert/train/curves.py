"""The training curves as a PNG: loss, and held-out clean and noisy accuracy, per epoch."""
from __future__ import annotations


def plot_training(history: list, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmcert.atomic import save_figure

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(epochs, [h["loss"] for h in history], marker="o", ms=3)
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    right.plot(epochs, [h["clean_accuracy"] for h in history], marker="o", ms=3, label="clean")
    right.plot(epochs, [h["noisy_accuracy"] for h in history], marker="o", ms=3, label="under noise")
    right.set(xlabel="epoch", ylabel="held-out accuracy", title="accuracy", ylim=(0, 1.02))
    right.legend(loc="lower right")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
