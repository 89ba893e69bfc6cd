"""Per-stage profile of the cached SAM pseudo-label refresh of nnUNetTrainerSemiSAM (``sam_pseudo_labels: cached``).

Builds the trainer as ``nnUNetv2_train`` would (labeled-subset mode, so the diagnostics score the pseudo-labels
against the hidden labels), loads a trained network's weights into the student, and runs the refresh of the first
``--cases`` unlabeled cases twice for each ``--windows`` choice: the first refresh encodes the images, the second
is what every later refresh of a training costs. Prints seconds per case and per stage (load, sliding-window
prediction, window placement, encoder, decoder with the click loop, back to the case grid, write), the number of
windows, and the pseudo-label Dice.

    python scripts/profile_refresh.py -d 902 -c 3d_fullres --checkpoint RUN/fold_0/checkpoint_final.pth \\
        --backend litemedsam --cases 2 --set "num_labeled=2"
    python scripts/profile_refresh.py ... --backend sam_med3d --set "num_labeled=2 sam_random_init=true"

The environment must hold nnUNet_raw / nnUNet_preprocessed / nnUNet_results as for training (the trainer writes
its pseudo-labels under a scratch results folder, which is deleted at the end).
"""
import argparse
import os
import sys
import tempfile
import time

import torch


def profile(args, windows: str):
    from nnunetv2_samssl.benchmark.speed import build_trainer

    os.environ["nnUNet_samssl_overrides"] = " ".join(
        [f"sam_pseudo_labels=cached sam_backend={args.backend} sam_cache_windows={windows}", args.set])
    fold = int(args.fold) if str(args.fold).isdigit() else args.fold
    trainer = build_trainer("nnUNetTrainerSemiSAM", args.dataset, args.configuration, fold, args.plans,
                            torch.device(args.device))
    trainer.initialize()
    checkpoint = torch.load(args.checkpoint, map_location=args.device, weights_only=False)
    trainer.network.load_state_dict(checkpoint["network_weights"])
    trainer.on_train_start()
    source = trainer.sam_source
    source.dataset.identifiers = source.dataset.identifiers[:args.cases]
    stats = []
    labeler = source.labeler
    original = labeler._pseudo_label

    def recording(*a, **k):
        out = original(*a, **k)
        stats.append(out.stats)
        return out
    labeler._pseudo_label = recording
    rows = []
    for run in ("first", "later"):
        stats.clear()
        start = time.perf_counter()
        source.refresh(5 if run == "first" else 10)
        seconds = time.perf_counter() - start
        rows.append((run, seconds / args.cases, {k: v / args.cases for k, v in source.stage_seconds.items()},
                     sum(s["num_encoded"] for s in stats) / args.cases,
                     sum(s["num_queries"] for s in stats) / args.cases,
                     source._stats.get("sam_pseudo_dice"), source._stats.get("prompt_dice")))
    trainer.on_train_end()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", required=True)
    parser.add_argument("-f", "--fold", default="0")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--checkpoint", required=True, help="a trained network of this configuration (its "
                        "network_weights go into the student)")
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--cases", type=int, default=2, help="unlabeled cases labelled per refresh")
    parser.add_argument("--windows", nargs="+", default=["roi", "whole"], choices=["roi", "whole"])
    parser.add_argument("--set", default="", help="more settings, as nnUNet_samssl_overrides")
    parser.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        sys.exit(f"ERROR: no checkpoint {args.checkpoint}: pass --checkpoint with a trained network of "
                 f"{args.configuration}")
    stages = ("load", "predict", "map", "encode", "decode", "to_patch", "write")
    table = []
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["nnUNet_results"] = scratch
        for windows in args.windows:
            for run, total, per_stage, encoded, queries, sam_dice, prompt_dice in profile(args, windows):
                table.append([windows, run, f"{total:.1f}"] + [f"{per_stage.get(s, 0.0):.2f}" for s in stages]
                             + [f"{encoded:.0f}", f"{queries:.0f}", f"{sam_dice:.4f}", f"{prompt_dice:.4f}"])
    head = ["windows", "refresh", "s/case"] + [f"{s} s" for s in stages] + ["encoded", "queries", "SAM Dice",
                                                                          "prompt Dice"]
    print(f"\nCached SAM refresh, {args.backend}, dataset {args.dataset} {args.configuration}, {args.cases} cases, "
          f"{args.device} ({torch.get_num_threads()} threads); per case")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
