"""Trainers (nnU-Net trainer subclasses) and what they share."""
