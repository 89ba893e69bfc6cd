"""The demo's picture: one held-out slice, each trainer's prediction outlined over the image next to the truth.

One panel per segmentation (a trainer's prediction, or any other map such as a SAM pseudo-label): the image in
grey, the reference outlined in white, the segmentation's classes outlined in colour, its Dice on this slice in
the title. The slice is the one of the held-out case whose reference shows the most classes (then the most
foreground), so every class is visible if any slice shows them all.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

CLASS_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def pick_slice(reference: np.ndarray, axis: int = 0) -> int:
    """Index along ``axis`` of the slice of ``reference`` (a label volume) with the most classes present, ties
    broken by the most foreground voxels, then by the lowest index."""
    if reference.ndim != 3:
        raise ValueError(f"reference must be a 3D label volume, got shape {reference.shape}")
    moved = np.moveaxis(reference, axis, 0)
    best, best_key = 0, (-1, -1)
    for i, s in enumerate(moved):
        key = (len(np.setdiff1d(np.unique(s), [0])), int((s > 0).sum()))
        if key > best_key:
            best, best_key = i, key
    return best


def slice_dice(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int]) -> float:
    """Mean Dice over the ``labels`` present in either map (NaN when none is)."""
    scores = []
    for c in labels:
        p, r = prediction == c, reference == c
        if p.any() or r.any():
            scores.append(2 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return float(np.mean(scores)) if scores else float("nan")


def save_segmentation_figure(path: str, image: np.ndarray, reference: np.ndarray,
                             segmentations: Mapping[str, np.ndarray], class_names: Mapping[int, str],
                             title: Optional[str] = None) -> str:
    """Writes the picture to ``path`` (PNG) and returns ``path``.

    Args:
        image: ``(H, W)`` slice of the image (any intensity scale).
        reference: ``(H, W)`` label slice (0 = background).
        segmentations: panel title -> ``(H, W)`` label slice, in panel order.
        class_names: label value -> name, for the legend (background excluded).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    for name, seg in {"reference": reference, **segmentations}.items():
        if seg.shape != image.shape:
            raise ValueError(f"{name} has shape {seg.shape}, the image slice {image.shape}")
    labels = sorted(class_names)
    colours = {c: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, c in enumerate(labels)}
    low, high = np.percentile(image, [0.5, 99.5])
    fig, axes = plt.subplots(1, len(segmentations), figsize=(3.2 * len(segmentations), 3.6), squeeze=False)
    for ax, (name, seg) in zip(axes[0], segmentations.items()):
        ax.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1, interpolation="nearest")
        for c in labels:
            if (reference == c).any():
                ax.contour(reference == c, levels=[0.5], colors="white", linewidths=1.6)
            if (seg == c).any():
                ax.contour(seg == c, levels=[0.5], colors=colours[c], linewidths=1.0)
        ax.set_title(f"{name}\nslice Dice {slice_dice(seg, reference, labels):.2f}", fontsize=8)
        ax.set_axis_off()
    handles = [Line2D([], [], color="white", lw=1.6, label="reference")] + \
              [Line2D([], [], color=colours[c], lw=1.0, label=class_names[c]) for c in labels]
    legend = fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=True)
    legend.get_frame().set_facecolor("#888888")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.9 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_label_names(dataset_json: Mapping) -> Dict[int, str]:
    """label value -> name of the foreground classes of a (label-based) ``dataset.json``."""
    out = {}
    for name, value in dataset_json["labels"].items():
        if name != "background" and name != "ignore" and isinstance(value, int):
            out[value] = name
    return out
