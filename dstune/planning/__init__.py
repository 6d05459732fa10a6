"""Costs before a run: the memory estimate, activation tracing, FLOPs and traffic, `dstune bench`, and the fit
that decides activation checkpointing `auto`."""
