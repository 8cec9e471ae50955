"""Ray Train: one DINO loop for both pretraining stages, checkpoints, resume, export."""
