"""Grids: ablations over modes, reductions, ratios and seeds, their reports and charts; the presets."""
