"""Evaluation helpers shared by the trainers, the demo and the benchmarks.

:mod:`nnunetv2_samssl.evaluation.metrics` holds the one Dice implementation of the package:

- :func:`~nnunetv2_samssl.evaluation.metrics.dice_per_class` and
  :func:`~nnunetv2_samssl.evaluation.metrics.mean_foreground_dice` on torch label maps (counting by nnU-Net's
  ``get_tp_fp_fn_tn``), e.g. for training-time diagnostics;
- :func:`~nnunetv2_samssl.evaluation.metrics.dice_per_class_on_folders` on folders of prediction/reference files
  (nnU-Net's ``compute_metrics_on_folder``).

Empty classes follow nnU-Net: a class absent from both prediction and reference has no Dice (NaN).
"""
