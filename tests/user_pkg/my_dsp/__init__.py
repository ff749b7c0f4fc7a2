"""A user's own dsp parts, kept outside the dsp package (docs/EXTENDING.md walks through it)."""
