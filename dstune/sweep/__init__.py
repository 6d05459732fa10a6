"""`dstune sweep`: a grid of settings trained as the adapters of one job over one base, ranked on held-out rows."""
