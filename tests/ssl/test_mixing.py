"""CutMix of unlabeled patches (``student_mix: cutmix``): the student sees mixed patches, every target is mixed with
the same boxes, so it stays aligned with the voxel it was predicted for."""
import numpy as np
import pytest
import torch

from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.ssl.mixing import BoxMix
from trainer_helpers import SAM, make_trainer, seed_everything, tiny_sam  # noqa: F401  (tiny_sam: autouse)


def _boxes(mask):
    """Per sample: the bounding box of the mask's voxels and whether the mask fills it exactly."""
    out = []
    for m in mask[:, 0]:
        idx = torch.nonzero(m)
        low, high = idx.min(0).values, idx.max(0).values + 1
        box = torch.zeros_like(m)
        box[tuple(slice(int(a), int(b)) for a, b in zip(low, high))] = True
        out.append((low, high, torch.equal(box, m)))
    return out


@pytest.mark.parametrize("shape", [(2, 1, 20, 24, 16), (4, 2, 32, 40)])
def test_each_sample_gets_one_box_of_its_partner_and_keeps_every_other_voxel(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape)
    volumes = []
    for _ in range(20):
        mix = BoxMix.draw(shape, 0.5, generator=gen)
        y = mix(x)
        assert y.shape == x.shape and torch.equal(mix.partner, (torch.arange(shape[0]) + 1) % shape[0])
        inside = mix.mask.expand_as(x)
        assert torch.equal(y[inside], x[mix.partner][inside])
        assert torch.equal(y[~inside], x[~inside])
        for low, high, filled in _boxes(mix.mask):
            assert filled  # one axis-aligned box
        volumes += mix.mask.flatten(1).float().mean(1).tolist()
    # fractions of the patch volume drawn in [0.5 / 4, 0.5] (up to rounding each side to whole voxels)
    assert 0.09 < min(volumes) and max(volumes) < 0.58 and np.std(volumes) > 0.05


def test_a_single_patch_cannot_be_mixed():
    with pytest.raises(ValueError, match="at least 2"):
        BoxMix.draw((1, 1, 8, 8, 8), 0.5)


def test_mixed_outputs_equal_the_outputs_of_the_mixed_patch_for_a_voxelwise_network():
    """Mixing the teacher's outputs of the unmixed patches is what a voxel-wise teacher would predict on the mixed
    patch: the boxes of the outputs sit where those of the images do."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 1)
    x = torch.randn(3, 2, 12, 16, 10)
    mix = BoxMix.draw(x.shape, 0.5)
    with torch.no_grad():
        assert torch.allclose(mix.outputs(net(x)), net(mix(x)), atol=1e-6)
        assert torch.allclose(mix.outputs([net(x)])[0], net(mix(x)), atol=1e-6)
    assert mix.outputs(None) is None


def test_deep_supervision_scales_are_mixed_as_nnunet_downsamples_its_targets():
    """Mixing each downsampled label map equals downsampling the mixed full-resolution map with nnU-Net's own
    transform (nearest-exact), at every scale."""
    scales = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.5, 0.25], [0.125, 0.25, 0.125]]
    down = DownsampleSegForDSTransform(scales)
    gen = torch.Generator().manual_seed(3)
    seg = torch.randint(0, 4, (2, 1, 24, 20, 16), generator=gen).to(torch.int16)
    for _ in range(10):
        mix = BoxMix.draw(seg.shape, 0.5, generator=gen)
        downsampled = [torch.stack([down._apply_to_segmentation(s)[k] for s in seg]) for k in range(len(scales))]
        mixed_then_down = [torch.stack([down._apply_to_segmentation(s)[k] for s in mix(seg)])
                           for k in range(len(scales))]
        for a, b in zip(mix.outputs(downsampled), mixed_then_down):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- in the trainer
def test_student_sees_mixed_patches_and_learns_the_mixed_teacher_targets(nnunet_env):
    """The teacher predicts the patches as loaded; the student sees their mix (then its strong view); the
    consistency loss gets the teacher's outputs mixed with the same boxes, and the diagnostics hidden labels mixed
    alike."""
    from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, student_mix="cutmix", teacher_noise_std=0.0,
                           num_labeled=2, use_unlabeled_folder=False)
    trainer.on_train_start()
    seen = {}
    student_forward, teacher_forward = trainer.network.forward, trainer.teacher.module.forward
    trainer.network.forward = lambda x, *a, **k: (seen.__setitem__("student", x.clone()),
                                                  student_forward(x, *a, **k))[1]

    def teacher(x, *a, **k):
        seen["teacher_in"] = x.clone()
        seen["teacher_out"] = [o.clone() for o in teacher_forward(x, *a, **k)]
        return seen["teacher_out"]
    trainer.teacher.module.forward = teacher
    mixes, draw = [], BoxMix.draw
    BoxMix.draw = classmethod(lambda cls, *a, **k: mixes.append(draw(*a, **k)) or mixes[-1])
    consistency, diagnostics = trainer.consistency_terms, trainer.unlabeled_diagnostics
    trainer.consistency_terms = lambda outputs, masks=None: (seen.__setitem__("targets", outputs.teacher),
                                                            consistency(outputs, masks))[1]
    trainer.unlabeled_diagnostics = lambda batch, outputs: (seen.__setitem__("hidden", batch.hidden_labels),
                                                            diagnostics(batch, outputs))[1]
    try:
        batch = next(trainer.dataloader_train)
        unlabeled = trainer.next_unlabeled_batch()
        assert unlabeled.hidden_labels is not None and bool((unlabeled.hidden_labels >= 0).any())
        trainer.next_unlabeled_batch = lambda: unlabeled
        out = trainer.train_step(batch)
    finally:
        BoxMix.draw = draw
    (mix,) = mixes
    b_l = batch["data"].shape[0]
    assert torch.equal(seen["teacher_in"], unlabeled.images)  # the teacher never sees a box edge
    assert torch.equal(seen["student"][:b_l], batch["data"])
    assert torch.equal(seen["student"][b_l:], mix(unlabeled.images))
    assert not torch.equal(seen["student"][b_l:], unlabeled.images)
    assert len(seen["targets"]) == len(seen["teacher_out"]) > 1
    for target, raw in zip(seen["targets"], seen["teacher_out"]):
        assert torch.equal(target, mix(raw)) and not torch.equal(target, raw)
    assert torch.equal(seen["hidden"], mix(unlabeled.hidden_labels))
    assert np.isfinite(float(out["consistency_loss"])) and np.isfinite(float(out["teacher_dice"]))
    trainer.on_train_end()


def test_mixing_is_off_by_default_and_draws_nothing(nnunet_env):
    from nnunetv2_samssl.pseudo_labels.base import UnlabeledBatch
    from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    trainer.initialize()
    batch, teacher = UnlabeledBatch(torch.randn(2, 1, 4, 4, 4), ["a", "b"]), [torch.randn(2, 3, 4, 4, 4)]
    state = torch.get_rng_state()
    assert trainer.mix_unlabeled(batch, teacher) == (batch, teacher)
    assert torch.equal(torch.get_rng_state(), state)


def test_mixing_refuses_what_it_cannot_keep_aligned(nnunet_env):
    from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
    from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM
    with pytest.raises(ConfigError, match="student_mix: none, or train nnUNetTrainerMeanTeacher"):
        make_trainer(nnUNetTrainerSemiSAM, nnunet_env, **SAM, student_mix="cutmix").initialize()
    single = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, student_mix="cutmix", unlabeled_batch_size=1)
    with pytest.raises(ConfigError, match="unlabeled_batch_size to at least 2"):
        single.on_train_start()
    single.on_train_end()


def test_mixing_refuses_learn_unannotated(sparse_env):
    from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
    with pytest.raises(ConfigError, match="learn_unannotated: false"):
        make_trainer(nnUNetTrainerMeanTeacher, sparse_env, student_mix="cutmix", learn_unannotated=True,
                     num_labeled=3).initialize()
