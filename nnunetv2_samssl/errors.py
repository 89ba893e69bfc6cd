"""Errors that explain a problem with the user's settings, data or files in their message.

When one ends a command (``nnUNetv2_train`` with a trainer of this package, or one of the package's own
commands), it is printed as ``ERROR: <message>`` without a traceback: the message names what is wrong and how
to fix it, and a traceback through nnU-Net's start-up code would only bury it. ``SAMSSL_TRACEBACK=1`` prints
the full traceback as well. Every other exception keeps Python's normal report.
"""
from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Base of the errors whose message is the whole report (see the module docstring)."""


def _report(exc_type, exc, tb, previous=sys.__excepthook__) -> None:
    if isinstance(exc, UserError) and os.environ.get("SAMSSL_TRACEBACK", "0") in ("0", ""):
        print(f"ERROR: {exc}\n(SAMSSL_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return
    previous(exc_type, exc, tb)


def install_excepthook() -> None:
    """Reports uncaught :class:`UserError` as one message (idempotent; other exceptions go to the hook that was
    installed before)."""
    if getattr(sys.excepthook, "_samssl", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        _report(exc_type, exc, tb, previous)

    hook._samssl = True
    sys.excepthook = hook
