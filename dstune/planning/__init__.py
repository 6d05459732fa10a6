"""Before a run: a first recipe (`dstune init`), the memory estimate, activation tracing, FLOPs and traffic,
`dstune bench`, and the fit that decides activation checkpointing `auto`."""
