"""The run dir: its lock (one job at a time), the checkpoint pointer, trainable.safetensors, loading a finished
run back, exporting it and chatting with it."""
