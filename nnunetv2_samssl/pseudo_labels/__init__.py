"""Pseudo-label sources: every way of making targets for unlabeled patches (see ``base``)."""
