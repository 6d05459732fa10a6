"""Loading models and tokenizers, the lean activation paths and the chunked causal-LM loss."""
