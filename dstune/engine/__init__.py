"""The training runtime: process group, DeepSpeed config and precision, the trainer and its loop, checkpoints,
evaluation."""
