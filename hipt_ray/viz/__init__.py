"""Plots and heatmaps (the only importer of matplotlib)."""
