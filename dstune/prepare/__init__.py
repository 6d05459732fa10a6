"""From data files to the prepared, packed Arrow cache every rank memory-maps: the pipeline, the cache,
augmentation."""
