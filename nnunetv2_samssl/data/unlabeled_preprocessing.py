"""``nnUNetv2_samssl_preprocess_unlabeled``: preprocess ``imagesUnlabeled/`` with the dataset's own plans.

Raw layout (nnU-Net's naming, as in ``imagesTr``)::

    nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/<case>_0000.nii.gz [<case>_0001.nii.gz ...]

A case's files are grouped as nnU-Net groups training images (every ``<case>_XXXX<file_ending>``, in channel
order), and the channel count is what the dataset's reader returns for them: usually one file per channel, but
with nnU-Net's natural-image convention (``NaturalImage2DIO``, ``channel_names`` R, G, B) one RGB
``<case>_0000.png`` holds all three channels.

Each case goes through the configuration's preprocessor exactly as nnU-Net preprocesses an image at
inference (``run_case(images, None, ...)``: transpose, crop to non-zero, normalise, resample) and is
written in nnU-Net's Blosc2 format into a SIBLING of the configuration's folder::

    nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/<case>.b2nd / <case>_seg.b2nd / <case>.pkl

(``_seg`` holds only nnU-Net's non-zero mask, -1 outside / 0 inside: no label information exists for
these cases.) It never goes into the configuration's own folder, which ``nnUNetv2_preprocess`` deletes.
The command is idempotent: finished cases are skipped (a case is finished once its ``.pkl``, written
last and atomically, exists); a manifest records the configuration it was made with, and cases made
with another configuration are redone.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Tuple

from nnunetv2_samssl.errors import UserError

UNLABELED_RAW_FOLDER = "imagesUnlabeled"
UNLABELED_SUFFIX = "_unlabeled"
MANIFEST = "unlabeled_manifest.json"


class UnlabeledDataError(RuntimeError, UserError):
    """Unlabeled data missing, malformed or not preprocessed."""


def unlabeled_preprocessed_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_folder_base, data_identifier + UNLABELED_SUFFIX)


# What nnU-Net's preprocessing of an image (DefaultPreprocessor.run_case) reads from the plans. The network, patch
# and batch size do not shape the data: plans files that share a data_identifier (nnU-Net's way of reusing
# preprocessed data, e.g. a copy of nnUNetPlans.json with another batch size) share the unlabeled folder too.
PREPROCESSING_KEYS = ("preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm",
                      "resampling_fn_data", "resampling_fn_data_kwargs")
PLANS_PREPROCESSING_KEYS = ("transpose_forward", "foreground_intensity_properties_per_channel",
                            "image_reader_writer")


def _digest(parts: dict, dataset_json: dict) -> str:
    payload = json.dumps({**parts, "channels": dataset_json.get("channel_names", dataset_json.get("modality")),
                          "file_ending": dataset_json.get("file_ending")}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def configuration_fingerprint(plans: dict, configuration: str, dataset_json: dict) -> str:
    """Hash of everything that shapes the preprocessed unlabeled images: the configuration's preprocessing keys
    (inherited ones resolved, as nnU-Net resolves ``inherits_from``), the plans' transposition, intensity
    statistics and reader, and the dataset's channels and file ending."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    resolved = PlansManager(plans).get_configuration(configuration).configuration
    return _digest({"configuration": {k: resolved.get(k) for k in PREPROCESSING_KEYS},
                    "plans": {k: plans.get(k) for k in PLANS_PREPROCESSING_KEYS}}, dataset_json)


def _legacy_fingerprint(configuration_dict: dict, dataset_json: dict) -> str:
    """The fingerprint manifests written before :func:`configuration_fingerprint` (the whole raw configuration
    dict): still accepted when it matches the current plans, so those folders are not preprocessed again."""
    return _digest({"configuration": configuration_dict}, dataset_json)


def manifest_matches(manifest: dict, plans: dict, configuration: str, dataset_json: dict) -> bool:
    """Whether a manifest's folder was preprocessed with what the current plans would do."""
    return manifest.get("fingerprint") in (configuration_fingerprint(plans, configuration, dataset_json),
                                           _legacy_fingerprint(plans["configurations"][configuration], dataset_json))


def collect_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict, reader=None) -> Dict[str, List[str]]:
    """Maps case id -> its image files (in channel order), checking nnU-Net's naming and the channel count.

    Files are grouped by case as nnU-Net groups ``imagesTr`` (``<case>_XXXX<file_ending>``). A case with one
    file per declared channel (``_0000`` .. ``_{n-1}``) is accepted without reading it; any other set of files
    is accepted when the dataset's reader gets exactly the declared channels from it (nnU-Net's natural-image
    convention: one RGB ``<case>_0000.png`` for channels R, G, B). Only one readable case per such file set is
    read here; :func:`image_problem` checks the channel count of every case.

    Args:
        reader: the dataset's image reader (an instance, e.g. ``PlansManager(plans).image_reader_writer_class()``);
            ``None``: determined from dataset.json as nnU-Net does, only if a case needs reading.

    Raises:
        UnlabeledDataError: folder missing or empty, a file not named ``<case>_XXXX<ending>``, a case with
            the wrong channels, or a case id equal to a labeled one.
    """
    folder = os.path.join(raw_dataset_folder, UNLABELED_RAW_FOLDER)
    ending = dataset_json["file_ending"]
    if not os.path.isdir(folder):
        raise UnlabeledDataError(
            f"No unlabeled images: the folder {folder} does not exist. Put the unlabeled images there with "
            f"nnU-Net's naming (<case>_0000{ending}, one file per channel), or use labeled-subset mode "
            f"(setting num_labeled or labeled_cases).")
    files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    if not files:
        raise UnlabeledDataError(f"{folder} contains no images. Expected files named <case>_0000{ending}.")
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    cases: Dict[str, Dict[int, str]] = {}
    bad = [f for f in files if not pattern.match(f)]
    if bad:
        raise UnlabeledDataError(
            f"Files in {folder} must be named <case>_XXXX{ending} (XXXX = 4-digit channel index); "
            f"these are not: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    for f in files:
        m = pattern.match(f)
        cases.setdefault(m["case"], {})[int(m["channel"])] = os.path.join(folder, f)
    cases = dict(sorted(cases.items()))
    ordered = {c: [ch[i] for i in sorted(ch)] for c, ch in cases.items()}
    wrong, reader = _cases_with_wrong_channels(ordered, {c: sorted(ch) for c, ch in cases.items()}, num_channels,
                                               dataset_json, reader)
    if wrong:
        case, (indices, got) = next(iter(wrong.items()))
        message = (f"dataset.json declares {num_channels} channel(s) (_0000 .. _{num_channels - 1:04d}) but "
                   f"{len(wrong)} unlabeled case(s) have other channels, e.g. '{case}' has {indices}")
        if got is not None:
            message += f" ({type(reader).__name__} reads {got} channel(s) from them)"
        message += f". Each case needs exactly one file per channel in {folder}"
        if got is not None and (got != len(indices) or type(reader).__name__ == "NaturalImage2DIO"):
            message += (f", or files from which the dataset's reader gets all {num_channels} channel(s) (nnU-Net's "
                        f"natural-image convention: one RGB <case>_0000{ending} for channels R, G, B)")
        raise UnlabeledDataError(message + ".")
    labeled = _labeled_identifiers(raw_dataset_folder, dataset_json)
    clash = sorted(set(cases) & labeled)
    if clash:
        raise UnlabeledDataError(
            f"Unlabeled case ids equal labeled ones: {clash[:5]}. Rename the files in {folder} "
            f"(e.g. with a prefix such as 'unl_') so every case id is unique.")
    return ordered


def _channels_read(reader, files: List[str]) -> Optional[int]:
    """How many channels ``reader`` gets from one case's files (nnU-Net stacks them), ``None`` if it cannot read
    them (:func:`image_problem` reports why)."""
    try:
        data, _ = reader.read_images(files)
    except Exception:  # noqa: BLE001 - an unreadable case is image_problem's to report
        return None
    return int(data.shape[0])


def _cases_with_wrong_channels(files: Dict[str, List[str]], indices: Dict[str, List[int]], num_channels: int,
                               dataset_json: dict, reader):
    """``({case: (channel indices, channels read or None)}, reader)`` of the cases whose files do not give the
    declared channels. Cases are taken by their set of channel indices: ``_0000 .. _{n-1}`` (one file per
    channel) is nnU-Net's standard layout and is not read; a gap in the numbering is always wrong; any other
    set is right when the reader gets ``num_channels`` channels from one of its readable cases."""
    standard = list(range(num_channels))
    layouts: Dict[Tuple[int, ...], List[str]] = {}
    for case, idx in indices.items():
        if idx != standard:
            layouts.setdefault(tuple(idx), []).append(case)
    wrong: Dict[str, Tuple[List[int], Optional[int]]] = {}
    for layout, members in layouts.items():
        counts: Dict[str, int] = {}
        if list(layout) == list(range(len(layout))):
            if reader is None:
                reader = _reader_from_dataset_json(dataset_json, files[members[0]][0])
            for case in members:
                got = _channels_read(reader, files[case])
                if got is not None:
                    counts[case] = got
                    if got == num_channels:
                        break
            if not counts or num_channels in counts.values():
                continue  # accepted (nothing readable: image_problem names the unreadable files)
        for case in members:
            wrong[case] = (list(layout), counts.get(case))
    return dict(sorted(wrong.items())), reader


def _reader_from_dataset_json(dataset_json: dict, example_file: str):
    """The reader nnU-Net's planning picks for this dataset (an instance)."""
    import contextlib
    import io

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # nnU-Net prints the traceback of every reader it tries
            return determine_reader_writer_from_dataset_json(dataset_json, example_file, verbose=False)()
    except RuntimeError:  # the example is unreadable (image_problem says why): choose by file ending alone
        pass
    try:
        return determine_reader_writer_from_dataset_json(dataset_json, None, verbose=False)()
    except RuntimeError as error:
        raise UnlabeledDataError(f"No nnU-Net image reader for {example_file}: {error}") from None


def copies_of_known_images(raw_dataset_folder: str, unlabeled_files: List[str]) -> List[Tuple[str, str]]:
    """``(unlabeled file, imagesTr / imagesTs file)`` pairs whose bytes are identical (SHA-256), sorted.

    An unlabeled image that is a renamed copy of a training or test image makes evaluation transductive (the
    model trains on a test image) or double-counts a case. Only files of equal size are hashed, so the check
    reads little more than the unlabeled images. A copy re-encoded into another file format is not caught.
    """
    sizes = {}
    for f in unlabeled_files:
        sizes.setdefault(os.path.getsize(f), []).append(f)
    digest = {}

    def sha256(path: str) -> str:
        if path not in digest:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digest[path] = h.hexdigest()
        return digest[path]

    pairs = []
    for sub in ("imagesTr", "imagesTs"):
        folder = os.path.join(raw_dataset_folder, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            known = os.path.join(folder, name)
            if not os.path.isfile(known):
                continue
            for candidate in sizes.get(os.path.getsize(known), []):
                if sha256(candidate) == sha256(known):
                    pairs.append((candidate, known))
    return sorted(pairs)


def image_problem(files: List[str], reader, dataset_is_3d: bool, num_channels: Optional[int] = None
                  ) -> Optional[str]:
    """What is wrong with one case's image files, or ``None``: the counterpart of nnU-Net's
    ``--verify_dataset_integrity`` for unlabeled images.

    Checks that every file is read completely (a ``.gz`` file is decompressed to its end: image readers may
    return a partial volume of a truncated one without a word), that the dataset's reader reads the case, that
    all files share one geometry (shape and spacing), that every value is finite, that the reader gets
    ``num_channels`` channels from the files (when given; one RGB ``.png`` holds three) and that the case is 3D
    exactly when the dataset is.
    """
    import gzip

    import numpy as np

    for f in files:
        if f.endswith(".gz"):
            try:
                with gzip.open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
            except (EOFError, OSError, gzip.BadGzipFile) as error:
                return f"{os.path.basename(f)} is truncated or corrupt ({error})"
    geometries = []
    channels = 0
    for f in files:
        try:
            data, properties = reader.read_images([f])
        except Exception as error:  # any reader failure is this file's problem, reported with its name
            return f"{os.path.basename(f)} cannot be read ({type(error).__name__}: {str(error)[:150]})"
        geometries.append((tuple(data.shape[1:]), tuple(np.round(properties["spacing"], 4))))
        channels += data.shape[0]
        if not np.isfinite(data).all():
            return f"{os.path.basename(f)} has {int((~np.isfinite(data)).sum())} non-finite value(s) (NaN or inf)"
    if len(set(geometries)) > 1:
        listing = ", ".join(f"{os.path.basename(f)}: shape {g[0]}, spacing {g[1]}" for f, g in zip(files, geometries))
        return f"its channels differ in geometry ({listing})"
    if num_channels is not None and channels != num_channels:
        return (f"{type(reader).__name__} reads {channels} channel(s) from its {len(files)} file(s) but dataset.json "
                f"declares {num_channels}")
    shape = geometries[0][0]
    if (shape[0] > 1) != dataset_is_3d:
        return (f"it is {'3D' if shape[0] > 1 else '2D'} (shape {shape}) but the dataset's images are "
                f"{'3D' if dataset_is_3d else '2D'}")
    return None


def _labeled_identifiers(raw_dataset_folder: str, dataset_json: dict) -> set:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    return set(get_filenames_of_train_images_and_targets(raw_dataset_folder, dataset_json).keys())


def _preprocess_one(args) -> str:
    case, image_files, out_folder, plans, configuration_name, dataset_json = args
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from batchgenerators.utilities.file_and_folder_operations import write_pickle

    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration_name)
    preprocessor = cm.preprocessor_class(verbose=False)
    data, nonzero_mask, properties = preprocessor.run_case(image_files, None, plans_manager, cm, dataset_json)
    data = data.astype(np.float32, copy=False)
    nonzero_mask = nonzero_mask.astype(np.int16, copy=False)
    properties["class_locations"] = {}
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_s, chunks_s = comp_blosc2_params(nonzero_mask.shape, tuple(cm.patch_size), nonzero_mask.itemsize)
    tmp = os.path.join(out_folder, f".tmp_{case}")
    nnUNetDatasetBlosc2.save_case(data, nonzero_mask, properties, tmp, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_s, blocks_seg=blocks_s)
    final = os.path.join(out_folder, case)
    os.replace(tmp + ".b2nd", final + ".b2nd")
    os.replace(tmp + "_seg.b2nd", final + "_seg.b2nd")
    write_pickle(properties, tmp + ".pkl")
    os.replace(tmp + ".pkl", final + ".pkl")  # the .pkl marks the case as finished
    return case


def preprocess_unlabeled(dataset_name_or_id, configuration: str, plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 2, verbose: bool = True, allow_duplicates: bool = False,
                         skip_bad_cases: bool = False) -> str:
    """Preprocesses every case of ``imagesUnlabeled/``; returns the output folder. See the module docstring.

    Checked before anything is written: every case's files (:func:`image_problem`; a bad case is an error naming
    it, or with ``skip_bad_cases`` it is left out with a listed warning and recorded in the manifest), and
    copies of ``imagesTr`` / ``imagesTs`` images (an error naming both files; ``allow_duplicates``: a warning).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    raw_folder = os.path.join(nnUNet_raw, dataset_name)
    pp_base = os.path.join(nnUNet_preprocessed, dataset_name)
    plans_file = os.path.join(pp_base, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UnlabeledDataError(
            f"Plans file {plans_file} not found. Plan and preprocess the labeled data first: "
            f"nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} -c {configuration}"
            + ("" if plans_identifier == "nnUNetPlans" else f" -pl <planner producing {plans_identifier}>"))
    plans = load_json(plans_file)
    if configuration not in plans["configurations"]:
        raise UnlabeledDataError(f"Configuration '{configuration}' is not in {plans_file}; it has "
                                 f"{sorted(plans['configurations'])}.")
    cm = PlansManager(plans).get_configuration(configuration)
    labeled_folder = os.path.join(pp_base, cm.data_identifier)
    if not os.path.isdir(labeled_folder):
        raise UnlabeledDataError(
            f"Configuration '{configuration}' is not preprocessed yet ({labeled_folder} missing). Run "
            f"nnUNetv2_preprocess -d {dataset_name_or_id} -c {configuration} -plans_name {plans_identifier} first.")
    dataset_json = load_json(os.path.join(pp_base, "dataset.json"))
    reader = PlansManager(plans).image_reader_writer_class()  # the reader nnU-Net preprocesses this dataset with
    cases = collect_unlabeled_cases(raw_folder, dataset_json, reader)
    dataset_is_3d = plans["original_median_shape_after_transp"][0] > 1
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    bad = {c: p for c, p in ((c, image_problem(files, reader, dataset_is_3d, num_channels))
                             for c, files in cases.items()) if p}
    if bad:
        listing = "\n".join(f"  {c}: {p}" for c, p in sorted(bad.items()))
        if not skip_bad_cases:
            raise UnlabeledDataError(f"{len(bad)} unlabeled case(s) in {UNLABELED_RAW_FOLDER}/ are unusable; nothing was "
                                     f"written:\n{listing}\nFix or remove them, or pass --skip_bad_cases to leave them "
                                     f"out.")
        print(f"WARNING: leaving out {len(bad)} unusable unlabeled case(s) (--skip_bad_cases):\n{listing}",
              file=sys.stderr)
        cases = {c: files for c, files in cases.items() if c not in bad}
        if not cases:
            raise UnlabeledDataError(f"No usable unlabeled case is left in {UNLABELED_RAW_FOLDER}/.")
    copies = copies_of_known_images(raw_folder, [f for files in cases.values() for f in files])
    if copies:
        listing = "; ".join(f"{os.path.basename(u)} = {os.path.relpath(k, raw_folder)}" for u, k in copies[:5]) \
            + (f"; ... and {len(copies) - 5} more" if len(copies) > 5 else "")
        message = (f"{len(copies)} unlabeled image file(s) are copies of training or test images ({listing}): "
                   f"training on them makes the evaluation transductive or counts a case twice.")
        if not allow_duplicates:
            raise UnlabeledDataError(message + f" Remove them from {UNLABELED_RAW_FOLDER}/, or pass "
                                               f"--allow_duplicates to keep them (with a warning).")
        print(f"WARNING: {message} Kept because --allow_duplicates was given.", file=sys.stderr)

    out_folder = unlabeled_preprocessed_folder(pp_base, cm.data_identifier)
    fingerprint = configuration_fingerprint(plans, configuration, dataset_json)
    manifest_file = os.path.join(out_folder, MANIFEST)
    if os.path.isfile(manifest_file) and not manifest_matches(load_json(manifest_file), plans, configuration,
                                                              dataset_json):
        if verbose:
            print(f"{out_folder} was made with another configuration: preprocessing all unlabeled cases again.")
        shutil.rmtree(out_folder)
    os.makedirs(out_folder, exist_ok=True)
    save_json({"fingerprint": fingerprint, "plans": plans_identifier, "configuration": configuration,
               "cases": sorted(cases), "skipped": {c: bad[c] for c in sorted(bad)}}, manifest_file)
    for f in os.listdir(out_folder):  # leftovers of an interrupted run
        if f.startswith(".tmp_"):
            os.remove(os.path.join(out_folder, f))

    todo = [c for c in cases if not os.path.isfile(os.path.join(out_folder, c + ".pkl"))]
    if verbose:
        print(f"{len(cases)} unlabeled case(s), {len(cases) - len(todo)} already done, {len(todo)} to preprocess "
              f"-> {out_folder}")
    jobs = [(c, cases[c], out_folder, plans, configuration, dataset_json) for c in todo]
    if num_processes <= 1 or len(jobs) <= 1:
        for j in jobs:
            _preprocess_one(j)
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            for _ in pool.imap_unordered(_preprocess_one, jobs):
                pass
    return out_folder


def check_unlabeled_folder(out_folder: str, plans: dict, dataset_json: dict, dataset_name: str,
                           configuration: str, plans_identifier: str,
                           raw_dataset_folder: Optional[str] = None) -> List[str]:
    """Returns the preprocessed unlabeled case ids, or raises naming the command that fixes the folder.

    With ``raw_dataset_folder`` every raw case must be preprocessed; without it (raw data not on this
    machine) the manifest's list of cases is trusted.
    """
    fix = (f"Run: nnUNetv2_samssl_preprocess_unlabeled -d {dataset_name} -c {configuration}"
           + ("" if plans_identifier == "nnUNetPlans" else f" -p {plans_identifier}"))
    manifest_file = os.path.join(out_folder, MANIFEST)
    if not os.path.isfile(manifest_file):
        raise UnlabeledDataError(f"The unlabeled images are not preprocessed for configuration '{configuration}' "
                                 f"({manifest_file} missing). {fix}")
    with open(manifest_file) as f:
        manifest = json.load(f)
    if not manifest_matches(manifest, plans, configuration, dataset_json):
        raise UnlabeledDataError(f"{out_folder} was preprocessed with other plans than the current ones. {fix}")
    if raw_dataset_folder is not None:  # every raw case but those the preprocessing left out as unusable
        skipped = manifest.get("skipped", {})
        cases = sorted(c for c in collect_unlabeled_cases(raw_dataset_folder, dataset_json) if c not in skipped)
    else:
        cases = sorted(manifest["cases"])
    missing = [c for c in cases if not os.path.isfile(os.path.join(out_folder, c + ".pkl"))]
    if missing:
        raise UnlabeledDataError(f"{len(missing)} unlabeled case(s) are not preprocessed yet "
                                 f"(e.g. {missing[:3]}). {fix}")
    return cases


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_samssl_preprocess_unlabeled",
        description="Preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled with the dataset's plans, exactly as nnU-Net "
                    "preprocesses images at inference. Idempotent: finished cases are skipped.")
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", required=True, nargs="+", help="configuration(s), e.g. 3d_fullres 2d")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-np", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 2)),
                        help="number of processes (default: nnUNet_def_n_proc or 2)")
    parser.add_argument("--skip_bad_cases", action="store_true",
                        help="leave out unreadable / inconsistent unlabeled cases with a listed warning instead of "
                             "stopping")
    parser.add_argument("--allow_duplicates", action="store_true",
                        help="only warn when an unlabeled image is a copy of an imagesTr / imagesTs image")
    args = parser.parse_args(argv)
    try:
        for c in args.c:
            preprocess_unlabeled(args.d, c, args.p, args.np, allow_duplicates=args.allow_duplicates,
                                 skip_bad_cases=args.skip_bad_cases)
    except UnlabeledDataError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
