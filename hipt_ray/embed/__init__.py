"""The embedding job (Ray Data batch inference into the Lance store)."""
