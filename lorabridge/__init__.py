"""lorabridge: one LoRA file for MindSpore/MindONE and PyTorch/diffusers.

The package is import-light on purpose: nothing here imports torch or mindspore,
so ``lorabridge --help``, ``validate`` and ``inspect`` stay fast. Framework code
lives in :mod:`lorabridge.adapters` and is imported only by the commands that need it.
"""

__version__ = "0.1.0"
