"""Prompt samplers that read only a segmentation model's own predictions, and labels of labeled patches only."""
from nnunetv2_samssl.prompts.grid_prompts import (ClassPrototypes, GridPrompts, adaptive_grid_points, class_masks,
                                                  prompts_from_prediction, reliable_region, two_density_prompts)
from nnunetv2_samssl.prompts.semisam_points import (PointPrompts, SemiSAMPointSampler, foreground_class_queries,
                                                    next_click, semisam_points)
from nnunetv2_samssl.prompts.uncertainty import (predictive_entropy, probability_variance, prompt_uncertainty,
                                                 student_teacher_disagreement)

__all__ = ["ClassPrototypes", "GridPrompts", "adaptive_grid_points", "class_masks", "prompts_from_prediction",
           "reliable_region", "two_density_prompts", "PointPrompts", "SemiSAMPointSampler", "foreground_class_queries", "next_click", "semisam_points",
           "predictive_entropy", "probability_variance", "prompt_uncertainty", "student_teacher_disagreement"]
