"""dstune: fine-tune Hugging Face models on DeepSpeed with full or parameter-efficient methods."""

__version__ = "0.1.0"
