"""Promptable segmentation backends (SAM-Med3D, 2D SAMs) behind one small interface."""
