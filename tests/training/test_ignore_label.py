"""Sparse annotation (nnU-Net's ignore label): every trainer trains; no loss, target or prompt ever holds the
ignore class; ``learn_unannotated`` gives the unlabeled-data terms to exactly the unannotated voxels of labeled
patches."""
import numpy as np
import pytest
import torch

from nnunetv2_samssl.pseudo_labels.base import NetworkOutputs
from nnunetv2_samssl.training.nnUNetTrainerCPACSAM import nnUNetTrainerCPACSAM
from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM
from sparse_like import IGNORE
from trainer_helpers import SAM, make_trainer, run_iterations, seed_everything, tiny_sam  # noqa: F401

TRAINERS = [(nnUNetTrainerLabeledSubset, {}), (nnUNetTrainerMeanTeacher, {}),
            (nnUNetTrainerSemiSAM, dict(SAM, sam_max_crops=2)),
            (nnUNetTrainerSemiSAM, dict(SAM, learn_unannotated=True, sam_max_crops=2)),
            (nnUNetTrainerMeanTeacher, dict(learn_unannotated=True)),
            (nnUNetTrainerCPACSAM, dict(sam_backend="sam_med3d", sam_random_init=True, cpac_warmup=0.0,
                                        learn_unannotated=True))]


@pytest.mark.parametrize("trainer_class, settings", TRAINERS,
                         ids=["LabeledSubset", "MeanTeacher", "SemiSAM", "SemiSAM_unannotated", "MT_unannotated",
                              "CPACSAM_unannotated"])
def test_every_trainer_trains_on_sparse_annotation(sparse_env, trainer_class, settings):
    seed_everything(0)
    trainer = make_trainer(trainer_class, sparse_env, num_labeled=3, **settings)
    assert trainer.label_manager.ignore_label == IGNORE
    trainer.initialize()
    assert trainer.label_manager.num_segmentation_heads == IGNORE  # the ignore class is never an output channel
    seen = []
    if isinstance(trainer, nnUNetTrainerSemiSAM):
        labeler = trainer.sam_source.labeler
        call = labeler.__call__

        def spy(images, student, teacher=None, **kwargs):
            out = call(images, student, teacher, **kwargs)
            seen.append((student.shape[1], out.probabilities.shape[1], images.shape[0]))
            return out
        trainer.sam_source.labeler = spy
    if isinstance(trainer, nnUNetTrainerCPACSAM):  # class-labelled points: real classes only, labeled ones too
        embed = trainer.cpac.segmenter.embed_points

        def spy_points(points, labels):
            seen.append(("points", int(labels.max()), points.shape[0]))
            return embed(points, labels)
        trainer.cpac.segmenter.embed_points = spy_points
    outs = run_iterations(trainer, 2)
    assert all(np.isfinite(float(o["loss"])) for o in outs)
    if isinstance(trainer, nnUNetTrainerCPACSAM):
        assert seen and all(top < IGNORE for _, top, _ in seen)
        assert np.isfinite(float(outs[-1]["cpac_cross_loss"]))
        return
    if seen:  # SAM is prompted and answers in the real classes only; with learn_unannotated it sees labeled too
        assert all(k_in == IGNORE and k_out == IGNORE for k_in, k_out, _ in seen)
        batch = trainer.configuration_manager.batch_size
        widened = settings.get("learn_unannotated", False)
        assert {b for _, _, b in seen} == {trainer.unlabeled_batch_size + (batch if widened else 0)}


def _consistency(trainer, student, teacher, masks):
    return trainer.consistency_terms(NetworkOutputs(student, teacher, trainer.label_space), masks)["consistency_loss"]


def test_learn_unannotated_reaches_exactly_the_unannotated_voxels(sparse_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, sparse_env, num_labeled=3, learn_unannotated=True,
                           consistency_scales="all")
    trainer.initialize()
    trainer.on_train_start()
    assert trainer.learns_unannotated
    batch = next(trainer.dataloader_train)
    target = batch["target"]
    b_l, b_u = target[0].shape[0], 2
    masks = trainer.unannotated_masks(target, b_u)
    for t, m in zip(target, masks):
        assert torch.equal(m[:b_l], t[:, 0] == IGNORE) and bool(m[b_l:].all())
    annotated = ~masks[0][:b_l]
    assert annotated.any() and masks[0][:b_l].any()

    shapes = [(b_l + b_u, IGNORE, *t.shape[2:]) for t in target]
    student = [torch.randn(s) for s in shapes]
    teacher = [torch.randn(s) for s in shapes]
    base = _consistency(trainer, student, teacher, masks)
    # the teacher may say anything at annotated voxels of labeled patches: nothing changes ...
    garbage = [t.clone() for t in teacher]
    for g, m in zip(garbage, masks):
        g.permute(0, *range(2, g.dim()), 1)[~m] = 100.0
    assert torch.equal(_consistency(trainer, student, garbage, masks), base)
    # ... while its unannotated voxels count
    changed = [t.clone() for t in teacher]
    changed[0].permute(0, 2, 3, 4, 1)[:b_l][masks[0][:b_l]] = 100.0
    assert not torch.equal(_consistency(trainer, student, changed, masks), base)


def test_without_the_setting_labeled_patches_get_no_unlabeled_terms(sparse_env):
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, sparse_env, num_labeled=3)
    trainer.initialize()
    assert not trainer.learns_unannotated
    seen = []
    teacher_outputs = trainer.teacher_outputs
    trainer.teacher_outputs = lambda b: seen.append(b.images.shape[0]) or teacher_outputs(b)
    run_iterations(trainer, 1)
    assert seen == [trainer.unlabeled_batch_size]

