"""memkern on torch.distributed: vocabulary-parallel distillation on DTensor, memkern layers
under FSDP2 and torch.distributed.checkpoint."""
