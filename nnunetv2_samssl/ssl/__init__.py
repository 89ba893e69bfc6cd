"""Method-agnostic semi-supervised pieces: EMA teacher, ramps, consistency and pseudo-label losses."""
