"""Dice, computed the way nnU-Net computes it, for tensors in memory and for folders of files.

Convention for empty classes (nnU-Net's, kept everywhere here): nnU-Net's ``compute_metrics`` gives
``Dice = NaN`` for a class when ``tp + fp + fn == 0``, i.e. when the class is absent from both the
prediction and the reference (over the voxels that are counted). Its ``summary.json`` then averages a
class over the cases with ``np.nanmean`` (cases without the class are left out) and ``foreground_mean``
is the plain mean of those class means (NaN if one class is NaN in every case). The functions below
return the NaN and leave the decision (skip, count as 1, count as 0) to the caller; nothing here counts
an empty/empty class as a perfect 1.0.

- :func:`dice_per_class` / :func:`mean_foreground_dice`: torch integer label maps ``(B, *spatial)``,
  counted with nnU-Net's ``get_tp_fp_fn_tn`` over the whole batch (all samples pooled).
- :func:`dice_per_class_on_folders`: prediction and reference files of a dataset, through nnU-Net's
  ``compute_metrics_on_folder`` with the dataset's reader/writer, file ending, labels/regions and
  ignore label.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn

__all__ = ["dice_per_class", "mean_foreground_dice", "dice_per_class_on_folders", "FolderDice"]

# voxels x foreground classes handled per get_tp_fp_fn_tn call: bounds the float32 temporaries (about
# 7 arrays of this many elements) for whole-volume inputs, and keeps every per-call count below 2**24,
# where float32 sums of 0/1 values stay exact (the chunk counts are added up in float64)
_CHUNK_ELEMENTS = 1 << 22

IgnoreSpec = Union[None, int, torch.Tensor, np.ndarray]


def _as_label_tensor(x: Union[torch.Tensor, np.ndarray], what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x).astype(np.int64) if x.dtype != bool else x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor or numpy array of integer labels, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"{what} must hold integer labels (e.g. an argmax), got dtype {x.dtype}")
    return x


def dice_per_class(prediction: Union[torch.Tensor, np.ndarray], reference: Union[torch.Tensor, np.ndarray],
                   num_classes: int, ignore: IgnoreSpec = None) -> torch.Tensor:
    """Dice of each foreground class ``1 .. num_classes-1``, counted with nnU-Net's ``get_tp_fp_fn_tn``.

    Args:
        prediction: ``(B, *spatial)`` integer label map (e.g. ``logits.argmax(1)``).
        reference: ``(B, *spatial)`` integer label map; voxels with ``reference < 0`` are unknown (nnU-Net
            writes -1 outside the nonzero region of the preprocessed segmentations) and are not counted,
            in either map.
        num_classes: number of classes including background (``K``). Label values outside ``0 .. K-1``
            belong to no class: a predicted class there is a false positive unless the voxel is excluded.
        ignore: voxels not counted besides the unknown ones: ``None``; an ``int`` label value (nnU-Net's
            ignore label: voxels where ``reference == ignore``); or a bool mask shaped like ``reference``,
            ``True`` = not counted.

    Returns:
        CPU float64 tensor of shape ``(K-1,)``: ``2 tp / (2 tp + fp + fn)`` per class, pooled over the batch.
        NaN where ``tp + fp + fn == 0`` (the class is absent from both maps over the counted voxels), as
        nnU-Net's ``compute_metrics`` does; callers decide how to treat it (:func:`mean_foreground_dice`
        leaves such classes out).
    """
    prediction = _as_label_tensor(prediction, "prediction")
    reference = _as_label_tensor(reference, "reference")
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} must have the "
                         f"same shape (B, *spatial)")
    if reference.ndim < 2:
        raise ValueError(f"label maps must be (B, *spatial), got shape {tuple(reference.shape)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes}")
    num_foreground = int(num_classes) - 1
    device = reference.device
    prediction = prediction.to(device)

    counted = reference >= 0
    if ignore is not None:
        if isinstance(ignore, (bool, np.bool_)) or not isinstance(ignore, (int, np.integer, torch.Tensor, np.ndarray)):
            raise TypeError(f"ignore must be None, an int label or a bool mask, got {type(ignore).__name__}")
        if isinstance(ignore, (int, np.integer)):
            counted &= reference != int(ignore)
        else:
            mask = torch.as_tensor(ignore, device=device)
            if mask.dtype != torch.bool or mask.shape != reference.shape:
                raise ValueError(f"an ignore mask must be a bool tensor of shape {tuple(reference.shape)}, got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            counted &= ~mask

    tp = torch.zeros(num_foreground, dtype=torch.float64)
    fp, fn = tp.clone(), tp.clone()
    if num_foreground > 0:
        classes = torch.arange(1, num_classes, device=device).view(1, -1, 1)
        flat_p, flat_r, flat_m = prediction.reshape(-1), reference.reshape(-1), counted.reshape(-1)
        chunk = max(1, _CHUNK_ELEMENTS // num_foreground)
        with torch.no_grad():
            for start in range(0, flat_r.numel(), chunk):
                # (1, K-1, n) one-hot maps of the foreground classes: same shape, so get_tp_fp_fn_tn takes the
                # reference as a one-hot encoding; mask (1, 1, n) is 1 for counted voxels
                p = (flat_p[start:start + chunk].view(1, 1, -1) == classes).float()
                r = (flat_r[start:start + chunk].view(1, 1, -1) == classes).float()
                m = flat_m[start:start + chunk].view(1, 1, -1).float()
                c_tp, c_fp, c_fn, _ = get_tp_fp_fn_tn(p, r, axes=(0, 2), mask=m)
                tp += c_tp.double().cpu()
                fp += c_fp.double().cpu()
                fn += c_fn.double().cpu()
    denominator = 2 * tp + fp + fn
    return torch.where(tp + fp + fn > 0, 2 * tp / denominator.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_foreground_dice(prediction: Union[torch.Tensor, np.ndarray], reference: Union[torch.Tensor, np.ndarray],
                         num_classes: int, ignore: IgnoreSpec = None) -> float:
    """Mean of :func:`dice_per_class` over the foreground classes present in either map (NaN-mean).

    Same arguments as :func:`dice_per_class`. Classes absent from both maps (NaN there) are left out;
    returns ``float('nan')`` when no foreground class is present in either map over the counted voxels.
    """
    dice = dice_per_class(prediction, reference, num_classes, ignore)
    present = dice[~torch.isnan(dice)]
    return float(present.mean()) if present.numel() else float("nan")


# ----------------------------------------------------------------------------------------------------
# folders of files
# ----------------------------------------------------------------------------------------------------
@dataclass
class FolderDice:
    """Dice of a folder of predictions against a folder of references (nnU-Net's ``compute_metrics_on_folder``).

    Attributes:
        per_class: class name -> mean Dice over the cases (``np.nanmean``: a case where the class is absent
            from both its prediction and its reference has no Dice for it and is left out; NaN when that
            holds for every case).
        mean: nnU-Net's ``foreground_mean`` Dice: the mean of ``per_class`` (NaN if one class is NaN).
        per_case: case identifier -> class name -> Dice of that case (NaN = class absent from both files).
        summary: the dictionary ``compute_metrics_on_folder`` returned (TP/FP/FN/TN, IoU, ... per case).
        summary_file: where that summary was saved as ``summary.json`` (``None`` if not saved).
    """

    per_class: Dict[str, float]
    mean: float
    per_case: Dict[str, Dict[str, float]]
    summary: Dict[str, Any] = field(repr=False)
    summary_file: Optional[str] = None


def _label_key(value: Any, has_regions: bool):
    if isinstance(value, (list, tuple)):
        value = tuple(int(v) for v in value)
        return value[0] if len(value) == 1 and not has_regions else value
    return int(value)


def dice_per_class_on_folders(prediction_folder: str, reference_folder: str,
                              dataset_json: Union[str, Mapping[str, Any]], output_file: Optional[str] = None,
                              image_reader_writer: Any = None, num_processes: Optional[int] = None) -> FolderDice:
    """Per-class Dice of every reference case, through nnU-Net's ``compute_metrics_on_folder``.

    Labels (or regions), their names, the ignore label and the file ending come from the dataset's
    ``dataset.json``; the reader/writer too (``overwrite_image_reader_writer``, else found from the file
    ending and a reference file), as ``nnUNetv2_evaluate_folder`` does. Files are matched by name; every
    reference case must have exactly one prediction and vice versa.

    Empty classes: see :class:`FolderDice` (nnU-Net's convention, NaN for a class absent from both files of a
    case, left out of that class's mean over the cases).

    Args:
        prediction_folder: prediction files ``<case><file_ending>`` (other files, e.g. nnU-Net's json files, are
            not read).
        reference_folder: reference segmentations, same names.
        dataset_json: the dataset's ``dataset.json`` (path or loaded dict).
        output_file: where to save nnU-Net's ``summary.json`` (optional).
        image_reader_writer: reader/writer instance or class to use instead of the one ``dataset.json`` gives.
        num_processes: worker processes of ``compute_metrics_on_folder`` (default nnU-Net's
            ``nnUNet_def_n_proc``, at most one per case).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json, subfiles
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    meta = load_json(dataset_json) if isinstance(dataset_json, (str, os.PathLike)) else dict(dataset_json)
    ending = meta["file_ending"]
    references = subfiles(reference_folder, suffix=ending, join=False)
    predictions = subfiles(prediction_folder, suffix=ending, join=False)
    if not references:
        raise ValueError(f"No reference files *{ending} in {reference_folder}")
    missing = sorted(set(references) - set(predictions))
    extra = sorted(set(predictions) - set(references))
    if missing or extra:
        raise ValueError(f"Predictions in {prediction_folder} do not match the references in {reference_folder}: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, without reference "
                         f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")

    labels = LabelManager(meta["labels"], meta.get("regions_class_order"))
    keys = labels.foreground_regions if labels.has_regions else labels.foreground_labels
    keys = [_label_key(k, labels.has_regions) for k in keys]
    names = {_label_key(v, labels.has_regions): n for n, v in meta["labels"].items()
             if n not in ("background", "ignore")}
    if image_reader_writer is None:
        image_reader_writer = determine_reader_writer_from_dataset_json(
            meta, os.path.join(reference_folder, references[0]), verbose=False)
    if isinstance(image_reader_writer, type):
        image_reader_writer = image_reader_writer()
    processes = max(1, min(default_num_processes if num_processes is None else int(num_processes), len(references)))
    with warnings.catch_warnings():  # nanmean over a class absent from every case: NaN is the intended answer
        warnings.simplefilter("ignore", RuntimeWarning)
        summary = compute_metrics_on_folder(reference_folder, prediction_folder, output_file, image_reader_writer,
                                            ending, keys, labels.ignore_label, num_processes=processes, chill=False)

    def name(key) -> str:
        return names.get(key, str(key))

    per_case = {}
    for case in summary["metric_per_case"]:
        identifier = os.path.basename(case["prediction_file"])[:-len(ending)]
        per_case[identifier] = {name(k): float(case["metrics"][k]["Dice"]) for k in keys}
    per_class = {name(k): float(summary["mean"][k]["Dice"]) for k in keys}
    return FolderDice(per_class, float(summary["foreground_mean"]["Dice"]), dict(sorted(per_case.items())), summary,
                      output_file)
