"""Unlabeled data: preprocessing of imagesUnlabeled/, labeled-subset splits, the unlabeled dataset and loader."""
