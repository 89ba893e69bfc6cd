"""``nnUNetv2_samssl_export_plain``: a trained results folder as a plain nnU-Net model (``nnUNetTrainer``).

A folder trained with this package's trainers predicts only where the package is installed: nnU-Net's
predictor builds the network through the trainer class named in ``checkpoint["trainer_name"]``. The network
itself is nnU-Net's own, so a copy whose checkpoints name ``nnUNetTrainer`` predicts with nnU-Net alone::

    nnUNet_results/DatasetXXX/<trainer>__<plans>__<config>/           (source, this package's trainer)
    <-o>/DatasetXXX/nnUNetTrainer__<plans>__<config>/                 (the export)
        dataset.json  plans.json  dataset_fingerprint.json  samssl_export.json
        fold_X/checkpoint_final.pth  checkpoint_best.pth  progress.png  debug.json  validation/summary.json

Each exported checkpoint keeps nnU-Net's keys only (``nnUNetTrainer.save_checkpoint``): ``trainer_name``
becomes ``nnUNetTrainer``, ``network_weights`` are the weights of the part the trainer predicted with (setting
``predict_with``: the EMA teacher or the student) and this package's training state (``checkpoint["samssl"]``)
is left out, so nothing in the file needs this package to be unpickled. ``optimizer_state`` and ``logging`` stay
as nnU-Net wrote them (the student's optimizer: they matter only to ``nnUNetv2_train --c``). Every exported
checkpoint is checked: the weights load into the network ``nnUNetTrainer`` builds from the plans, and the file
references no class of this package.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickletools
import shutil
import sys
import zipfile
from typing import Dict, List, Optional, Sequence, Set, Tuple

from nnunetv2_samssl.errors import UserError

PLAIN_TRAINER = "nnUNetTrainer"
EXPORT_INFO = "samssl_export.json"
CHECKPOINT_KEY = "samssl"  # training.nnunet_seam.CHECKPOINT_KEY (not imported: that module imports torch and nnU-Net)
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
# what nnUNetTrainer.save_checkpoint writes; nothing else is exported
NNUNET_CHECKPOINT_KEYS = ("network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema",
                          "current_epoch", "init_args", "trainer_name", "inference_allowed_mirroring_axes")
TRAINER_FILES = ("dataset.json", "plans.json", "dataset_fingerprint.json")
FOLD_FILES = ("progress.png", "debug.json", "network_architecture.pdf", os.path.join("validation", "summary.json"))
PACKAGE = __name__.split(".")[0]
SECOND_DECODER = "decoder_b."  # networks.dual_decoder.DualDecoderNetwork: two branches on one encoder
BRANCHES = ("branch_a", "branch_b")


class ExportError(RuntimeError, UserError):
    """The model cannot be exported (missing folder or checkpoint, inconsistent checkpoint)."""


def predicting_part(checkpoint: dict) -> Optional[str]:
    """Name of the part whose weights the trainer predicted with (``predict_with``; the student by default), or
    ``None`` for a checkpoint without this package's state (a plain nnU-Net checkpoint)."""
    state = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(state, dict) or "parts" not in state:
        return None
    return str((state.get("config") or {}).get("predict_with", "student"))


def _same_weights(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def plain_checkpoint(checkpoint: dict, part: Optional[str] = None) -> Tuple[dict, str]:
    """``(plain nnU-Net checkpoint, name of the part exported)``.

    Args:
        checkpoint: a checkpoint written by this package's trainers (or by nnU-Net).
        part: export this part's weights (e.g. ``"student"``) instead of those the trainer predicted with.
    """
    chosen = predicting_part(checkpoint)
    missing = [k for k in ("network_weights", "init_args", "trainer_name") if k not in checkpoint]
    if missing:
        raise ExportError(f"not an nnU-Net checkpoint (no {missing})")
    two_decoders = any(k.startswith(SECOND_DECODER) for k in checkpoint["network_weights"])
    if two_decoders or part in BRANCHES:
        if not two_decoders:
            raise ExportError(f"its network has one decoder (written by {checkpoint['trainer_name']}); --part "
                              f"{part} applies to two-branch models (nnUNetTrainerCPACSAM)")
        if part not in BRANCHES:
            raise ExportError(f"its network has two decoders ({checkpoint['trainer_name']}) and predicts with the "
                              f"mean of both, which nnU-Net's plain network cannot hold. Export one branch with "
                              f"--part branch_a or --part branch_b (its predictions differ from the mean of the "
                              f"two), or predict with this package installed")
        plain = {k: checkpoint[k] for k in NNUNET_CHECKPOINT_KEYS if k in checkpoint}
        plain["network_weights"] = one_branch(checkpoint["network_weights"], part)
        plain["trainer_name"] = PLAIN_TRAINER
        return plain, part
    if chosen is None:
        if part not in (None, "student"):
            raise ExportError(f"it holds one network only (written by {checkpoint['trainer_name']}); there is no "
                              f"part {part!r}")
        weights, name = checkpoint["network_weights"], "student"
    else:
        parts = checkpoint[CHECKPOINT_KEY]["parts"]
        name = part or chosen
        if name not in parts:
            raise ExportError(f"it has no part {name!r} (parts: {sorted(parts)})")
        weights = parts[name]["weights"]
        if name == chosen and not _same_weights(weights, checkpoint["network_weights"]):
            raise ExportError(f"its network_weights differ from the weights of the predicting part {name!r}: the "
                              f"checkpoint is inconsistent")
    plain = {k: checkpoint[k] for k in NNUNET_CHECKPOINT_KEYS if k in checkpoint}
    plain["network_weights"] = {k: v.detach().cpu().clone() for k, v in weights.items()}
    plain["trainer_name"] = PLAIN_TRAINER
    return plain, name


def one_branch(weights: dict, branch: str) -> dict:
    """The plain network of one branch of a two-decoder network (``encoder`` + ``decoder`` or ``decoder_b``)."""
    keep, drop = ("decoder.", SECOND_DECODER) if branch == "branch_a" else (SECOND_DECODER, "decoder.")
    out = {}
    for k, v in weights.items():
        if k.startswith(drop):
            continue
        name = "decoder." + k[len(keep):] if k.startswith(keep) else k
        out[name] = v.detach().cpu().clone()
    return out


def pickled_modules(path: str) -> Set[str]:
    """Top-level modules whose objects a ``torch.save`` file references (its pickle's GLOBAL opcodes)."""
    modules: Set[str] = set()
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        data = archive.read(name)
    strings: List[str] = []
    for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
        if opcode.name == "GLOBAL":
            modules.add(str(arg).split(" ")[0].split(".")[0])
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            modules.add(strings[-2].split(".")[0])
        elif isinstance(arg, str):
            strings.append(arg)
    return modules


def check_loads_into_plain_network(weights: dict, trainer_folder: str, configuration: str) -> None:
    """Loads ``weights`` (strictly) into the network ``nnUNetTrainer`` builds from the folder's plans, as
    ``nnUNetv2_predict`` does."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(load_json(os.path.join(trainer_folder, "plans.json")))
    dataset_json = load_json(os.path.join(trainer_folder, "dataset.json"))
    cm = plans_manager.get_configuration(configuration)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, cm, determine_num_input_channels(plans_manager, cm, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    try:
        network.load_state_dict(weights)
    except RuntimeError as error:
        raise ExportError(f"the weights do not fit nnU-Net's network for these plans: {str(error)[:300]}") from None


def _write_json(obj, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _dataset_name(dataset_name_or_id, results_root: str) -> str:
    """``DatasetXXX_Name``: an id is looked up in ``results_root`` first, then as nnU-Net looks it up."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    text = str(dataset_name_or_id)
    if text.isdigit() and os.path.isdir(results_root):
        found = sorted(d for d in os.listdir(results_root) if d.startswith(f"Dataset{int(text):03d}_"))
        if len(found) == 1:
            return found[0]
    try:
        return maybe_convert_to_dataset_name(dataset_name_or_id)
    except (RuntimeError, ValueError) as error:
        raise ExportError(str(error).splitlines()[0]) from None


def foreign_objects(obj, package: str = PACKAGE, where: str = "checkpoint") -> List[str]:
    """Where in ``obj`` (nested dicts, lists, tuples) objects of ``package``'s classes are."""
    found = []
    if type(obj).__module__.split(".")[0] == package:
        found.append(f"{where}: {type(obj).__name__}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += foreign_objects(k, package, f"{where} key") + foreign_objects(v, package, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            found += foreign_objects(v, package, f"{where}[{i}]")
    return found


def _folds(source: str, folds: Optional[Sequence[str]]) -> List[str]:
    if folds is None:
        found = sorted(d for d in os.listdir(source)
                       if d.startswith("fold_") and os.path.isdir(os.path.join(source, d)))
        if not found:
            raise ExportError(f"{source} has no fold_X folder: nothing to export.")
        return found
    names = [f"fold_{f}" for f in folds]
    missing = [n for n in names if not os.path.isdir(os.path.join(source, n))]
    if missing:
        raise ExportError(f"{source} has no {', '.join(missing)} (trained folds: "
                          f"{sorted(d for d in os.listdir(source) if d.startswith('fold_'))}).")
    return names


def _checkpoints(fold_folder: str, names: Optional[Sequence[str]]) -> List[str]:
    if names is None:
        found = [n for n in CHECKPOINTS if os.path.isfile(os.path.join(fold_folder, n))]
        if not found:
            raise ExportError(f"{fold_folder} has neither {' nor '.join(CHECKPOINTS)} (training not finished?); "
                              f"name another checkpoint with -chk.")
        return found
    missing = [n for n in names if not os.path.isfile(os.path.join(fold_folder, n))]
    if missing:
        raise ExportError(f"{os.path.join(fold_folder, missing[0])} not found.")
    return list(names)


def export_plain(dataset_name_or_id, configuration: str, trainer: str, output_results: str,
                 plans_identifier: str = "nnUNetPlans", folds: Optional[Sequence[str]] = None,
                 checkpoints: Optional[Sequence[str]] = None, part: Optional[str] = None,
                 results_root: Optional[str] = None, verbose: bool = True) -> str:
    """Writes the plain copy of one trained configuration (see the module docstring); returns its folder.

    Args:
        output_results: results root of the export (``<output_results>/DatasetXXX/nnUNetTrainer__...``).
        folds: fold names (``0``, ``all``); ``None``: every trained fold.
        checkpoints: file names in each fold; ``None``: those of ``checkpoint_final.pth`` / ``checkpoint_best.pth``
            that exist.
        part: export this part's weights instead of those the trainer predicted with.
        results_root: where the trained folder is (default ``nnUNet_results``).
    """
    import torch

    from nnunetv2_samssl.training.checkpointing import atomic_torch_save

    if results_root is None:
        from nnunetv2.paths import nnUNet_results
        if not nnUNet_results.is_set():
            raise ExportError("nnUNet_results is not set: it must name the results folder holding the trained model.")
        results_root = str(nnUNet_results)
    dataset_name = _dataset_name(dataset_name_or_id, results_root)
    identifier = f"{plans_identifier}__{configuration}"
    source = os.path.join(results_root, dataset_name, f"{trainer}__{identifier}")
    target = os.path.join(output_results, dataset_name, f"{PLAIN_TRAINER}__{identifier}")
    if not os.path.isdir(source):
        raise ExportError(f"No trained model: {source} does not exist (check -d, -c, -tr, -p and nnUNet_results).")
    if os.path.abspath(source) == os.path.abspath(target):
        raise ExportError(f"{source} is already a plain {PLAIN_TRAINER} folder; nothing to export.")
    if os.path.isdir(target) and not os.path.isfile(os.path.join(target, EXPORT_INFO)):
        raise ExportError(f"{target} exists and was not written by this command (a model trained with "
                          f"{PLAIN_TRAINER}?); choose another -o.")
    for f in ("dataset.json", "plans.json"):
        if not os.path.isfile(os.path.join(source, f)):
            raise ExportError(f"{os.path.join(source, f)} not found: {source} is not a complete nnU-Net results "
                              f"folder.")
    fold_names = _folds(source, folds)
    jobs = [(fold, name) for fold in fold_names for name in _checkpoints(os.path.join(source, fold), checkpoints)]

    info_file = os.path.join(target, EXPORT_INFO)
    info = {"source": os.path.abspath(source), "trainer": trainer, "folds": {}}
    if os.path.isfile(info_file):  # an earlier export of other folds / checkpoints
        with open(info_file) as f:
            earlier = json.load(f)
        if earlier.get("source") != info["source"]:
            raise ExportError(f"{target} holds an export of {earlier.get('source')}; folds of two models must not "
                              f"mix: choose another -o.")
        info["folds"] = earlier.get("folds", {})
    os.makedirs(target, exist_ok=True)
    _write_json(info, info_file)  # first: the folder is marked as an export even if this one fails midway
    for f in TRAINER_FILES:
        if os.path.isfile(os.path.join(source, f)):
            shutil.copy2(os.path.join(source, f), os.path.join(target, f))
    exported: Dict[str, Dict[str, str]] = {}
    for fold, name in jobs:
        path = os.path.join(source, fold, name)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # a truncated or foreign file: one line naming it
            raise ExportError(f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]})") from None
        try:
            plain, exported_part = plain_checkpoint(checkpoint, part)
            check_loads_into_plain_network(plain["network_weights"], target,
                                           plain["init_args"].get("configuration", configuration))
            foreign = foreign_objects(plain)
            if foreign:
                raise ExportError(f"objects of {PACKAGE} remain in nnU-Net's keys ({', '.join(foreign[:3])})")
        except ExportError as error:
            raise ExportError(f"{path}: {error}") from None
        os.makedirs(os.path.join(target, fold), exist_ok=True)
        out = os.path.join(target, fold, name)
        atomic_torch_save(plain, out)
        foreign = pickled_modules(out) & {PACKAGE}
        if foreign:
            os.remove(out)
            raise ExportError(f"{out} would still reference {sorted(foreign)}; not exported.")
        exported.setdefault(fold, {})[name] = exported_part
        if verbose:
            print(f"{os.path.join(fold, name)}: weights of the {exported_part} "
                  f"(trained by {checkpoint['trainer_name']}, epoch {checkpoint.get('current_epoch')})")
    for fold in fold_names:
        for f in FOLD_FILES:
            src = os.path.join(source, fold, f)
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(target, fold, f)), exist_ok=True)
                shutil.copy2(src, os.path.join(target, fold, f))
    crossval = f"crossval_results_folds_{'_'.join(f[len('fold_'):] for f in fold_names)}"
    for f in ("summary.json", "postprocessing.pkl", "postprocessing.json"):
        src = os.path.join(source, crossval, f)
        if os.path.isfile(src):
            os.makedirs(os.path.join(target, crossval), exist_ok=True)
            shutil.copy2(src, os.path.join(target, crossval, f))
    for fold, names in exported.items():
        info["folds"].setdefault(fold, {}).update({n: {"weights": p} for n, p in names.items()})
    _write_json(info, info_file)
    if verbose:
        print(f"Exported to {target}. Predict without this package: nnUNet_results={output_results} "
              f"nnUNetv2_predict -d {dataset_name} -c {configuration} -tr {PLAIN_TRAINER} -p {plans_identifier} "
              f"-f {' '.join(f[len('fold_'):] for f in fold_names)} -i INPUT -o OUTPUT")
    return target


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_samssl_export_plain",
        description="Copy a model trained with this package's trainers into a results folder that plain nnU-Net "
                    "(without this package) predicts with: trainer nnUNetTrainer, network_weights = the weights "
                    "the trainer predicted with (predict_with), no extra training state.")
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", required=True, nargs="+", help="configuration(s), e.g. 3d_fullres 2d")
    parser.add_argument("-tr", required=True, help="trainer the model was trained with, e.g. nnUNetTrainerMeanTeacher")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", nargs="+", default=None, help="folds (default: every trained fold)")
    parser.add_argument("-chk", nargs="+", default=None,
                        help="checkpoint file names (default: checkpoint_final.pth and checkpoint_best.pth, those "
                             "that exist)")
    parser.add_argument("-o", required=True,
                        help="results root of the export; the model goes to <-o>/DatasetXXX/nnUNetTrainer__<plans>__"
                             "<configuration>. Point nnUNet_results there to predict with it")
    parser.add_argument("--part", default=None,
                        help="export this part's weights (student, teacher) instead of those the trainer predicted "
                             "with; for two-branch models (nnUNetTrainerCPACSAM): branch_a or branch_b")
    args = parser.parse_args(argv)
    try:
        for c in args.c:
            export_plain(args.d, c, args.tr, args.o, args.p, args.f, args.chk, args.part)
    except ExportError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
