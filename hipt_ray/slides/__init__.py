"""Slides: reader at an exact MPP, tissue masks, region/patch grids, QC, synthetic slides.

No torch and no Ray here.
"""
