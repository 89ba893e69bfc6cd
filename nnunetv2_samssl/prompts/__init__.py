"""Prompt samplers that read only a segmentation model's own predictions (never labels)."""
from nnunetv2_samssl.prompts.semisam_points import (PointPrompts, SemiSAMPointSampler, foreground_class_queries,
                                                    next_click, semisam_points)
from nnunetv2_samssl.prompts.uncertainty import (predictive_entropy, probability_variance, prompt_uncertainty,
                                                 student_teacher_disagreement)

__all__ = ["PointPrompts", "SemiSAMPointSampler", "foreground_class_queries", "next_click", "semisam_points",
           "predictive_entropy", "probability_variance", "prompt_uncertainty", "student_teacher_disagreement"]
