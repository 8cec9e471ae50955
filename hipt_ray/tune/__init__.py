"""Ray Tune sweeps of slide-level heads, every trial an MLflow run."""
