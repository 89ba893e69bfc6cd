"""Network architectures built on nnU-Net's (see :mod:`.dual_decoder`)."""
