"""The LoRA toolbox on the neutral model (issue 13): fit check, extract and fuse (and resize/merge), framework-free."""
