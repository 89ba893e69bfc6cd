"""Pseudo-label Dice of real LiteMedSAM on real CT slices seen through nnU-Net's augmentation vs the geometry-only
view the online SAM branch uses (``sam_view: unscaled``).

For each of 2 axial slices through the L3 vertebral body of tptbox's CT sample and each of ``--draws`` seeds, the
slice and its expert label go through (a) nnU-Net's training transforms and (b) ``geometry_only_view`` of them
(same seed, so the same crop, rotation and mirroring); a degraded prediction (eroded, shifted) prompts
LiteMedSAM as nnUNetTrainerSemiSAM does, and the pseudo-label is scored against the transformed label.

    python scripts/measure_sam_view.py --draws 12     # about 3 minutes on 2 CPU cores
"""
import argparse
import random

import numpy as np
import torch
from scipy.ndimage import binary_erosion, shift as nd_shift

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_samssl.evaluation.metrics import mean_foreground_dice
from nnunetv2_samssl.sam.branch import SamPseudoLabeler
from nnunetv2_samssl.sam.lite_medsam import LiteMedSAMPromptable
from nnunetv2_samssl.testing.real_anatomy import VERTEBRAL_BODY, load_spine_sample
from nnunetv2_samssl.training.nnunet_seam import geometry_only_view


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=12, help="augmentation draws per slice")
    args = parser.parse_args()
    case = load_spine_sample("ct")
    body = case.mask(22, VERTEBRAL_BODY)
    fg = case.vertebra > 0
    low, high = np.percentile(case.image[fg], [0.5, 99.5])  # nnU-Net's CT normalisation
    image = np.clip(case.image, low, high)
    image = (image - image[fg].mean()) / image[fg].std()
    z = np.flatnonzero(body.sum(axis=(1, 2)) > 40)
    slices = [int(np.quantile(z, q, method="nearest")) for q in (0.35, 0.65)]
    labeler = SamPseudoLabeler(LiteMedSAMPromptable.from_checkpoint(None), mode="point", prompt_kind="boxes",
                               num_clicks=1, roi_margin=0.3, box_margin=10)  # nnUNetTrainerSemiSAM's defaults
    full = nnUNetTrainer.get_training_transforms(tuple(image.shape[1:]), (-np.pi, np.pi), None, (0, 1), False)
    for name, transforms in (("nnU-Net augmentation", full), ("geometry-only view", geometry_only_view(full))):
        before, after = [], []
        for s in slices:
            for seed in range(args.draws):
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
                out = transforms(image=torch.from_numpy(image[s][None]).float(),
                                 segmentation=torch.from_numpy(body[s][None]).to(torch.int16))
                truth = out["segmentation"][0].long().clamp_min(0)
                if int((truth == 1).sum()) < 40:
                    continue
                degraded = nd_shift(binary_erosion(truth.numpy() == 1, iterations=2).astype(float), (2, -2),
                                    order=0) > 0.5
                student = torch.from_numpy(np.where(degraded, 0.9, 0.1)).float()[None, None]
                pseudo = labeler(out["image"][None], torch.cat([1 - student, student], 1),
                                 patch_spacing=case.spacing_mm[1:], generator=torch.Generator().manual_seed(0))
                before.append(mean_foreground_dice(torch.from_numpy(degraded).long()[None], truth[None], 2))
                after.append(mean_foreground_dice(pseudo.hard_label, truth[None], 2))
        print(f"{name}: {len(after)} draws, degraded prediction Dice {np.mean(before):.3f} -> SAM pseudo-label Dice "
              f"{np.mean(after):.3f} (sd {np.std(after):.3f})")


if __name__ == "__main__":
    main()
