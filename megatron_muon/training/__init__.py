"""The training loop and what it needs around megatron-core: the step and the trainer, checkpoints (model,
optimizer state, files and resume), FSDP, layout-independent initialization and metrics."""
