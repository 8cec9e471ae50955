"""The tile stage: slides → tissue, region grids and QC thumbnails in Lance, as Ray tasks."""
