"""Summaries of the shifted-cohort benchmark (dataset 903) across the committed results folders of README.md that
used paired seeds.

    python examples/fewlabel/summarize_shifted.py   # writes the four files below next to it

- ``schedule_gain.md`` / ``.png``: the gain of Mean Teacher (``mt_strong_hard``) over labeled-only nnU-Net against
  the training length. Each point is one seed; lines join the mean gain over the seeds of each length.
- ``shifted_1500.md`` / ``.png``: every row run at 1500 iterations (labeled-only, Mean Teacher, SemiSAM, ...), per
  seed and N, with the mean and spread over the seeds each row has, and SemiSAM minus Mean Teacher for every seed
  where both ran on one machine.

A gain is the test Dice of a run minus that of the labeled-only run with the same training seed in the same folder
(``dice_gain_paired``), in points. A seeded run reproduces to the last digit on one machine and environment, not
necessarily on another (another CPU's kernels or other package versions round differently, and 1500 iterations
amplify it), so each folder names its machine and a row gets one line per machine. A run that is in two folders of
one machine (copied so that a folder's table has its pair) must have the same Dice in both. The schedule table and
plot use the first machine, which ran every length.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from collections import defaultdict
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = "labeled-only"
SCHEDULE_ROW = "mt_strong_hard"
FIRST_MACHINE = 1
# results folder -> (iterations per run, training seed of repeat 0: --training-seed of its command, machine)
SOURCES: Dict[str, Tuple[int, int, int]] = {
    "shifted_levers": (375, 0, 1),
    "shifted_long": (750, 0, 1),
    "shifted_long_n4": (750, 1, 1),
    "shifted_60": (1500, 0, 1),
    "shifted_60_n4": (1500, 1, 1),
    "shifted_60_n4_seed2": (1500, 2, 1),
    "shifted_60_n4_seed0": (1500, 0, 1),
    "shifted_60_n2_sam": (1500, 0, 1),
    "shifted_60_n2_sam_seed1": (1500, 1, 2),
    "shifted_60_n2_sam_seed2": (1500, 2, 2),
    "shifted_60_n2_seed0_check": (1500, 0, 2),
    "shifted_60_n2_seed1_env3": (1500, 1, 3),
    "shifted_60_n2_seed2_env3": (1500, 2, 3),
    "shifted_60_n2_seed0_env4": (1500, 0, 4),
    "shifted_60_n2_seed1_env4": (1500, 1, 4),
    "shifted_60_n4_seed0_env5": (1500, 0, 5),
    "shifted_60_n4_seed1_env6": (1500, 1, 6),
    "shifted_60_n4_seed2_env6": (1500, 2, 6),
}
MACHINES = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth"}
ROWS_1500 = {  # row -> label in the 1500-iteration table, in this order
    BASELINE: "labeled-only nnU-Net",
    "mt_strong_hard": "Mean Teacher, `mt_strong_hard` (preset `mean_teacher_strong`)",
    "mt_strong_hard_ema095": "Mean Teacher, `mt_strong_hard` with `ema_decay=0.95`",
    "sam_strong": "SemiSAM, `sam_strong` (`mt_strong_hard` + LiteMedSAM term)",
    "sam_cached": "SemiSAM, `sam_cached` (`mt_strong_hard` + cached LiteMedSAM pseudo-labels)",
}
SAM_ROWS = ("sam_strong", "sam_cached")  # rows set against Mean Teacher, seed by seed

Run = Tuple[float, float]  # (test Dice, gain over the labeled-only run of the same seed, points; nan for it)
Key = Tuple[str, int, int, int]  # (row, N, iterations, machine)


def read_runs() -> Dict[Key, Dict[int, Run]]:
    """{(row, N, iterations, machine): {seed: (Dice, gain)}}; row is the variant name or ``labeled-only``."""
    out: Dict[Key, Dict[int, Run]] = defaultdict(dict)
    for folder, (iterations, first_seed, machine) in SOURCES.items():
        with open(os.path.join(HERE, folder, "fewlabel_results.csv")) as f:
            for r in csv.DictReader(f):
                row = BASELINE if r["kind"] == "supervised" else (r["variant"] or r["trainer"])
                seed = first_seed + int(r["repeat"])
                gain = float("nan") if row == BASELINE else 100 * float(r["dice_gain_paired"])
                if row != BASELINE and math.isnan(gain):
                    raise ValueError(f"{folder}: run {r['repeat']} of {row} has no labeled-only pair")
                key = (row, int(r["num_labeled"]), iterations, machine)
                run = (float(r["dice_mean"]), gain)
                if seed in out[key] and out[key][seed][0] != run[0]:
                    raise ValueError(f"{row}, seed {seed}, N = {key[1]}, {iterations} iterations, machine {machine}: "
                                     f"two folders with different results ({out[key][seed][0]} and {run[0]})")
                out[key][seed] = run
    return out


def _mean_std(values: List[float], unit: str = "seed") -> str:
    if len(values) == 1:
        return f"{values[0]:+.1f} (one {unit})"
    return f"{statistics.mean(values):+.1f} ± {statistics.stdev(values):.1f} ({len(values)} {unit}s)"


def _machine_suffix(machine: int) -> str:
    """What a row's label says of its machine: nothing for the first."""
    return "" if machine == FIRST_MACHINE else f", {MACHINES[machine]} machine"


def schedule_table(runs) -> str:
    lines = ["| N | iterations | seeds | labeled-only Dice per seed | `mt_strong_hard` Dice per seed | "
             "gain per seed (points) | mean gain ± std |", "|---|---|---|---|---|---|---|"]
    for (row, n, iterations, m) in sorted(k for k in runs if k[0] == SCHEDULE_ROW and k[3] == FIRST_MACHINE):
        mt, base = runs[(row, n, iterations, m)], runs[(BASELINE, n, iterations, m)]
        seeds = sorted(mt)
        g = [mt[s][1] for s in seeds]
        lines.append(f"| {n} | {iterations} | {', '.join(map(str, seeds))} | "
                     f"{', '.join(f'{base[s][0]:.3f}' for s in seeds)} | "
                     f"{', '.join(f'{mt[s][0]:.3f}' for s in seeds)} | "
                     f"{', '.join(f'{x:+.1f}' for x in g)} | {_mean_std(g)} |")
    return "\n".join(lines) + "\n"


def pooled(runs, row: str, n: int, iterations: int) -> Dict[int, Run]:
    """{seed: run} of a row over every machine; a seed run on two machines counts once, from the first one."""
    out: Dict[int, Run] = {}
    for m in sorted(MACHINES, reverse=True):
        out.update(runs.get((row, n, iterations, m), {}))
    return out


def rows_table(runs, iterations: int = 1500) -> str:
    seeds = sorted({s for (row, n, it, m), by_seed in runs.items() if it == iterations for s in by_seed})
    lines = ["| row | N | " + " | ".join(f"seed {s}" for s in seeds) + " | mean Dice | mean gain ± std |",
             "|---|---|" + "---|" * len(seeds) + "---|---|"]

    def line(label: str, n: int, by_seed: Dict[int, Run], baseline: bool) -> str:
        cells = [("" if s not in by_seed else f"{by_seed[s][0]:.3f}" if baseline
                  else f"{by_seed[s][0]:.3f} ({by_seed[s][1]:+.1f})") for s in seeds]
        dice = statistics.mean(v[0] for v in by_seed.values())
        gain = "" if baseline else _mean_std([v[1] for v in by_seed.values()])
        return f"| {label} | {n} | " + " | ".join(cells) + f" | {dice:.3f} | {gain} |"

    for n in (2, 4):
        for row, label in ROWS_1500.items():
            per_machine = {m: runs[(row, n, iterations, m)] for m in MACHINES if runs.get((row, n, iterations, m))}
            for m, by_seed in per_machine.items():
                lines.append(line(label + _machine_suffix(m), n, by_seed, row == BASELINE))
            every = pooled(runs, row, n, iterations)
            if row != BASELINE and len(per_machine) > 1 and all(len(every) > len(b) for b in per_machine.values()):
                lines.append(line(f"{label}, every seed", n, every, False))  # seeds no one machine has together
    lines += ["", "SemiSAM minus Mean Teacher (`mt_strong_hard`), test Dice points, for every seed where both ran on one "
              "machine (so against the same labeled-only run); a SemiSAM row without a Mean Teacher run of its seed "
              "and machine is not here:", "",
              "| N | SemiSAM row | machine | seed | Mean Teacher gain | SemiSAM gain | SemiSAM minus Mean Teacher |",
              "|---|---|---|---|---|---|---|"]
    for n in (2, 4):
        for sam_row in SAM_ROWS:
            diffs: List[float] = []
            for m in MACHINES:
                mt = runs.get(("mt_strong_hard", n, iterations, m), {})
                sam = runs.get((sam_row, n, iterations, m), {})
                for s in sorted(set(mt) & set(sam)):
                    diffs.append(sam[s][1] - mt[s][1])
                    lines.append(f"| {n} | `{sam_row}` | {MACHINES[m]} | {s} | {mt[s][1]:+.1f} | "
                                 f"{sam[s][1]:+.1f} | {diffs[-1]:+.1f} |")
            if diffs:
                lines.append(f"| {n} | `{sam_row}` | | mean | | | {_mean_std(diffs, unit='pair')} |")
    return "\n".join(lines) + "\n"


def plot_schedule(runs, path: str) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, n in zip(axes, (2, 4)):
        lengths = sorted(it for (row, m, it, machine) in runs
                         if row == SCHEDULE_ROW and m == n and machine == FIRST_MACHINE)
        means: List[float] = []
        for it in lengths:
            by_seed = runs[(SCHEDULE_ROW, n, it, FIRST_MACHINE)]
            for seed, (_, g) in sorted(by_seed.items()):
                ax.scatter(it, g, color=f"C{seed}", s=25, zorder=3, label=f"seed {seed}" if it == lengths[0] else None)
            means.append(statistics.mean(r[1] for r in by_seed.values()))
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


def plot_rows(runs, path: str, iterations: int = 1500) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS_1500 if r != BASELINE]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, n in zip(axes, (2, 4)):
        for i, row in enumerate(rows):
            for j, (m, marker) in enumerate(zip(MACHINES, "o^sDvP", strict=True)):
                for seed, (_, g) in sorted(runs.get((row, n, iterations, m), {}).items()):
                    ax.scatter(i + 0.1 * (j - (len(MACHINES) - 1) / 2), g, color=f"C{seed}", marker=marker, s=30,
                               zorder=3, label=f"seed {seed}" + _machine_suffix(m) if i == 0 or m != FIRST_MACHINE else None)
            by_seed = pooled(runs, row, n, iterations)
            if by_seed:
                ax.hlines(statistics.mean(v[1] for v in by_seed.values()), i - 0.3, i + 0.3, color="k", lw=2)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)), rows, rotation=20, fontsize=7)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_title(f"N = {n} labeled cases")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            unique = dict(zip(labels, handles))
            ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower left")
    axes[0].set_ylabel("test Dice gain over labeled-only (points)")
    fig.suptitle(f"Shifted cohort, {iterations} iterations: gain per paired seed (bar: mean over seeds, each once; "
                 "dashed: 5 points)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    runs = read_runs()
    for name, text in (("schedule_gain.md", schedule_table(runs)), ("shifted_1500.md", rows_table(runs))):
        with open(os.path.join(HERE, name), "w") as f:
            f.write(text)
        print(text)
    plot_schedule(runs, os.path.join(HERE, "schedule_gain.png"))
    plot_rows(runs, os.path.join(HERE, "shifted_1500.png"))


if __name__ == "__main__":
    main()
