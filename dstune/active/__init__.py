"""Active learning: score a pool with a trained run (`dstune select`) and the labelling loop (`dstune
active-learn`)."""
