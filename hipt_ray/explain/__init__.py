"""The stages that explain embeddings: attention heatmaps and similar-region search. They read
slides, tables and trained heads; what they draw is in :mod:`hipt_ray.viz`."""
