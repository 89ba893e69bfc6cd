"""The SAM pseudo-label sources against the anchors' forms (hard target, whole-patch mean, v1 constants)."""
import pytest
import torch

from nnunetv2_samssl.config.schema import ConfigError, resolve_config
from nnunetv2_samssl.config.settings import SEMISAM_LAYOUT, SEMISAM_SCHEMA, PseudoLabelLossSettings, Settings
from nnunetv2_samssl.pseudo_labels.base import NetworkOutputs, SourceContext, StepInfo, UnlabeledBatch
from nnunetv2_samssl.pseudo_labels.loss import PseudoLabelLoss
from nnunetv2_samssl.pseudo_labels.sam_online import OnlineSamSource
from nnunetv2_samssl.sam.branch import SamPseudoLabeler
from nnunetv2_samssl.ssl.consistency import CONSISTENCY_LOSSES
from sam_fakes import SPACE_3D, FakeSam

PATCH = (16, 40, 40)


def _context():
    return SourceContext(device=torch.device("cpu"), num_classes=2, patch_spacing=(3.0, 2.0, 2.0), patch_size=PATCH,
                         patch_ndim=3, deep_supervision_scales=None, output_folder="/nonexistent", log=print,
                         predict_case=None)


def _loss_settings(**changes):
    base = dict(sam_loss="soft_mse", sam_loss_scales="full_res", sam_target="hard", sam_loss_normalization="patch",
                sam_weight=0.1, sam_weight_schedule="sigmoid_rampdown", sam_rampdown=1.0)
    return PseudoLabelLossSettings(**{**base, **changes})


def _batch():
    images = torch.zeros(1, 1, *PATCH)
    images[0, 0, 4:12, 10:30, 10:30] = 1.0
    logits = torch.zeros(1, 2, *PATCH)
    logits[0, 1, 5:11, 12:28, 12:28] = 4.0  # the student predicts part of the object
    return UnlabeledBatch(images, ["u0"]), NetworkOutputs(logits.requires_grad_(), logits.detach())


def test_default_target_is_sams_output_binarised_and_the_loss_the_anchors_patch_mean():
    batch, outputs = _batch()
    labeler = SamPseudoLabeler(FakeSam(SPACE_3D, radius=40.0), mode="point", num_clicks=2)
    soft = OnlineSamSource(labeler, _loss_settings(sam_target="soft"), _context())
    hard = OnlineSamSource(labeler, _loss_settings(), _context())
    soft_targets = soft.pseudo_labels(batch, outputs, StepInfo(0, 10))
    hard.generator.manual_seed(12345)
    hard_targets = hard.pseudo_labels(batch, outputs, StepInfo(0, 10))
    assert hard_targets.hard and not soft_targets.hard
    sam_probability = soft_targets.targets[0][:, 1]
    assert torch.equal(hard_targets.targets[0], (sam_probability > 0.5).long())  # one class: SAM > 0.5
    assert 0 < hard_targets.valid[0].float().mean() < 1
    assert hard_targets.weight == pytest.approx(0.1)

    loss = PseudoLabelLoss("soft_mse", 2, normalization="patch")(outputs.student, hard_targets)
    one_hot = torch.stack([1 - hard_targets.targets[0], hard_targets.targets[0]], 1).float()
    squared = (torch.softmax(outputs.student, 1) - one_hot).pow(2) * hard_targets.valid[0].unsqueeze(1)
    assert float(loss.detach()) == pytest.approx(float(squared.mean()), rel=1e-6)  # torch.mean over the whole patch


def test_semisam_v1_reproduces_the_original_constants():
    cfg, _ = resolve_config(SEMISAM_SCHEMA, "semisam", config="semisam_v1", overrides={"sam_checkpoint": "/x"},
                            environ={})
    settings = Settings.from_config(SEMISAM_LAYOUT, cfg)
    assert settings.sam_loss.sam_weight == 0.05 and settings.sam_loss.sam_target == "hard"
    assert settings.sam_loss.sam_loss_normalization == "patch" and settings.mean_teacher.consistency_weight == 0.1
    student, teacher = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 4, 4, 4)
    difference = torch.softmax(student, 1) - torch.softmax(teacher, 1)
    halved = CONSISTENCY_LOSSES[settings.mean_teacher.consistency_loss](student, teacher)
    assert float(halved) == pytest.approx(float(difference.pow(2).sum() / (2 * difference.numel())), rel=1e-6)


def test_cached_pseudo_labels_cannot_be_soft():
    with pytest.raises(ConfigError, match="sam_target: soft"):
        resolve_config(SEMISAM_SCHEMA, "semisam", overrides={"sam_pseudo_labels": "cached", "sam_target": "soft",
                                                             "sam_checkpoint": "/x"}, environ={})


def test_the_channel_sam_sees_is_named_by_index_or_by_dataset_json():
    from nnunetv2_samssl.pseudo_labels.sam_online import resolve_image_channel
    brats = {"0": "T1", "1": "T1c", "2": "T2", "3": "FLAIR"}
    assert resolve_image_channel(0, brats, backend_is_2d=False) == 0
    assert resolve_image_channel("T1c", brats, backend_is_2d=False) == 1
    assert resolve_image_channel("FLAIR", brats, backend_is_2d=True) == 3
    with pytest.raises(ConfigError, match=r"sam_image_channel='t1ce' names no channel.*\['T1', 'T1c', 'T2', 'FLAIR'\]"):
        resolve_image_channel("t1ce", brats, backend_is_2d=False)
    with pytest.raises(ConfigError, match="sam_image_channel=4 is not a channel index"):
        resolve_image_channel(4, brats, backend_is_2d=False)
    photo = {"0": "R", "1": "G", "2": "B"}
    assert resolve_image_channel("rgb", {"0": "B", "1": "G", "2": "R"}, backend_is_2d=True) == (2, 1, 0)
    assert resolve_image_channel("rgb", photo, backend_is_2d=True) == (0, 1, 2)
    with pytest.raises(ConfigError, match="SAM-Med3D sees one"):
        resolve_image_channel("rgb", photo, backend_is_2d=False)
    with pytest.raises(ConfigError, match="needs channels named R, G and B"):
        resolve_image_channel("rgb", brats, backend_is_2d=True)


def test_backends_see_the_chosen_channel():
    from nnunetv2_samssl.sam.sam_med3d.promptable import SAMMed3DPromptable
    from nnunetv2_samssl.sam.segment_anything_2d import min_max_first_channel

    torch.manual_seed(0)
    patch = torch.randn(2, 3, 32, 32, 32)
    second = SAMMed3DPromptable.from_checkpoint(None, config="tiny", random_init=True, image_channel=2)
    first = SAMMed3DPromptable.from_checkpoint(None, config="tiny", random_init=True)
    torch.testing.assert_close(second.normalize(patch), first.normalize(patch[:, 2:3]))
    assert not torch.allclose(second.normalize(patch), first.normalize(patch))
    rgb = min_max_first_channel(patch[:, :, 0], (0, 1, 2))  # one min and max over the three channels
    assert rgb.shape == (2, 3, 32, 32) and float(rgb.amin()) == 0.0 and float(rgb.amax()) == 1.0
    joint = (patch[:, :, 0] - patch[:, :, 0].amin((1, 2, 3), keepdim=True))
    joint = joint / (patch[:, :, 0].amax((1, 2, 3), keepdim=True) - patch[:, :, 0].amin((1, 2, 3), keepdim=True))
    torch.testing.assert_close(rgb, joint)
