"""Lance tables: the only code that knows their layouts."""

from hipt_ray.store.tables import (
    REGIONS,
    REGIONS_SCHEMA,
    SLIDES,
    SLIDES_SCHEMA,
    Store,
    embedding_fields,
    read_embeddings,
)

__all__ = ["REGIONS", "REGIONS_SCHEMA", "SLIDES", "SLIDES_SCHEMA", "Store", "embedding_fields", "read_embeddings"]
