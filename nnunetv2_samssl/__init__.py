"""nnunetv2-samssl: semi-supervised nnU-Net v2 trainers driven by Segment-Anything models.

Importing this package must stay cheap (it runs at every Python start-up through the installed
``.pth`` file): no torch, no nnU-Net imports here.
"""
__version__ = "0.1.0"
