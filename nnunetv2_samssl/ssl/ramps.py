"""Weight schedules of the SSL literature.

``sigmoid_rampup(t, L) = exp(-5 (1 - clip(t, 0, L) / L)^2)``; a length of 0 means "already ramped".
"""
import math


def sigmoid_rampup(step: float, length: float) -> float:
    """Rises from exp(-5) ~ 0.0067 at ``step=0`` to 1 at ``step >= length``."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def sigmoid_rampdown(step: float, total: float, length: float) -> float:
    """SemiSAM's ramp-DOWN: ``r(total - step, length)``; 1 while ``total - step >= length``, ~0 at the end."""
    return sigmoid_rampup(total - step, length)
