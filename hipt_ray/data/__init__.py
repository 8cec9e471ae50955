"""Ray Data builders: region reads (CPU tasks) and model actors."""
