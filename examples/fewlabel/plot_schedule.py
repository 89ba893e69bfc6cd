"""The gain of Mean Teacher (`mt_strong_hard`) over labeled-only nnU-Net against the training length, on the
shifted cohort (dataset 903), from the committed results of the sections of README.md that used paired seeds.

    python examples/fewlabel/plot_schedule.py   # writes schedule_gain.png and schedule_gain.md next to it

Each point is one seed: the test Dice of `mt_strong_hard` minus that of the labeled-only run with the same
training seed (`dice_gain_paired`), in points. Lines join the mean gain over the seeds of each length.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from collections import defaultdict
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROW = "mt_strong_hard"
# results folder -> (iterations per run, training seed of repeat 0: --training-seed of its command)
SOURCES: Dict[str, Tuple[int, int]] = {
    "shifted_levers": (375, 0),
    "shifted_long": (750, 0),
    "shifted_long_n4": (750, 1),
    "shifted_60": (1500, 0),
    "shifted_60_n4": (1500, 1),
}


def read_gains() -> Dict[Tuple[int, int], Dict[int, Tuple[float, float, float]]]:
    """{(N, iterations): {seed: (labeled-only Dice, mt_strong_hard Dice, gain in points)}}"""
    out: Dict[Tuple[int, int], Dict[int, Tuple[float, float, float]]] = defaultdict(dict)
    for folder, (iterations, first_seed) in SOURCES.items():
        with open(os.path.join(HERE, folder, "fewlabel_results.csv")) as f:
            rows = list(csv.DictReader(f))
        base = {(r["num_labeled"], r["repeat"]): float(r["dice_mean"]) for r in rows if r["kind"] == "supervised"}
        for r in rows:
            if r["variant"] != ROW:
                continue
            seed = first_seed + int(r["repeat"])
            key = (int(r["num_labeled"]), iterations)
            if seed in out[key]:
                raise ValueError(f"seed {seed} at N = {key[0]}, {iterations} iterations is in two folders")
            gain = float(r["dice_gain_paired"])
            if math.isnan(gain):
                raise ValueError(f"{folder}: run {r['repeat']} of {ROW} has no labeled-only pair")
            out[key][seed] = (base[(r["num_labeled"], r["repeat"])], float(r["dice_mean"]), 100 * gain)
    return out


def table(gains) -> str:
    lines = ["| N | iterations | seeds | labeled-only Dice per seed | `mt_strong_hard` Dice per seed | "
             "gain per seed (points) | mean gain ± std |", "|---|---|---|---|---|---|---|"]
    for (n, iterations) in sorted(gains):
        runs = gains[(n, iterations)]
        seeds = sorted(runs)
        g = [runs[s][2] for s in seeds]
        spread = f"{statistics.mean(g):+.1f} ± {statistics.stdev(g):.1f}" if len(g) > 1 else f"{g[0]:+.1f} (one seed)"
        lines.append(f"| {n} | {iterations} | {', '.join(map(str, seeds))} | "
                     f"{', '.join(f'{runs[s][0]:.3f}' for s in seeds)} | "
                     f"{', '.join(f'{runs[s][1]:.3f}' for s in seeds)} | "
                     f"{', '.join(f'{x:+.1f}' for x in g)} | {spread} |")
    return "\n".join(lines) + "\n"


def plot(gains, path: str) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, n in zip(axes, (2, 4)):
        lengths = sorted(it for (m, it) in gains if m == n)
        means: List[float] = []
        for it in lengths:
            runs = gains[(n, it)]
            for seed, (_, _, g) in sorted(runs.items()):
                ax.scatter(it, g, color=f"C{seed}", s=25, zorder=3, label=f"seed {seed}" if it == lengths[0] else None)
            means.append(statistics.mean(r[2] for r in runs.values()))
        ax.plot(lengths, means, "k-", lw=1.5, label="mean over seeds")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(5, color="grey", lw=0.8, ls="--", label="5 points")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.set_xlabel("training iterations")
        ax.set_title(f"N = {n} labeled cases")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test Dice gain over labeled-only (points)")
    fig.suptitle("Mean Teacher (strong view, hard targets) on the shifted cohort, paired seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    gains = read_gains()
    md = table(gains)
    with open(os.path.join(HERE, "schedule_gain.md"), "w") as f:
        f.write(md)
    plot(gains, os.path.join(HERE, "schedule_gain.png"))
    print(md)


if __name__ == "__main__":
    main()
