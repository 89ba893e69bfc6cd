"""Per-epoch SSL metrics in nnU-Net's logger and in ``progress.png``.

nnU-Net's ``LocalLogger`` keeps one list per key and plots only its own keys. :class:`SSLLocalLogger`
adds our keys (registered up front so they survive checkpoints) and one more panel per metric group.
"""
from __future__ import annotations

import os
from typing import Dict, Sequence

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402


class SSLLocalLogger(LocalLogger):
    """``LocalLogger`` plus SSL keys, drawn in extra panels of ``progress.png``.

    Args:
        panels: ``{panel title: [keys]}``; every key is logged once per epoch (NaN when not computed).
    """

    def __init__(self, panels: Dict[str, Sequence[str]], verbose: bool = False):
        super().__init__(verbose)
        self.panels = {title: list(keys) for title, keys in panels.items()}
        for keys in self.panels.values():
            for key in keys:
                self.my_fantastic_logging.setdefault(key, [])

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        for keys in self.panels.values():  # a checkpoint from an older run may lack a key: pad with NaN
            for key in keys:
                n = len(self.my_fantastic_logging["train_losses"])
                values = self.my_fantastic_logging.setdefault(key, [])
                values.extend([float("nan")] * (n - len(values)))

    def plot_progress_png(self, output_folder):
        n_epochs = min(len(v) for v in self.my_fantastic_logging.values())
        if n_epochs == 0:
            return
        x = list(range(n_epochs))
        log = self.my_fantastic_logging
        fig, axes = plt.subplots(3 + len(self.panels), 1, figsize=(16, 6 * (3 + len(self.panels))))

        ax = axes[0]
        ax.plot(x, log["train_losses"][:n_epochs], color="b", label="loss_tr")
        ax.plot(x, log["val_losses"][:n_epochs], color="r", label="loss_val")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot(x, log["mean_fg_dice"][:n_epochs], color="g", ls="dotted", label="pseudo dice")
        ax2.plot(x, log["ema_fg_dice"][:n_epochs], color="g", label="pseudo dice (mov. avg.)")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")

        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:n_epochs],
                                           log["epoch_start_timestamps"][:n_epochs])]
        axes[1].plot(x, durations, color="b", label="epoch duration")
        axes[1].set_ylabel("time [s]")
        axes[1].set_ylim(bottom=0)
        axes[1].legend(loc="upper left")

        axes[2].plot(x, log["lrs"][:n_epochs], color="b", label="learning rate")
        axes[2].set_ylabel("learning rate")
        axes[2].legend(loc="upper left")

        for ax, (title, keys) in zip(axes[3:], self.panels.items()):
            for key in keys:
                ax.plot(x, log[key][:n_epochs], label=key)
            ax.set_title(title)
            ax.legend(loc="upper left")
        for ax in axes:
            ax.set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress.png"))
        plt.close(fig)
