"""The LoRA toolbox: operations on the one model (:class:`~lorabridge.model.LoraModel`), framework-free.

:mod:`.svd` holds the shared low-rank math (full singular spectrum of a module from its factors,
rank choice, the error a low-rank module leaves), :mod:`.resize` and :mod:`.merge` the
operations, :mod:`.report` what they report and :mod:`.files` how the commands read any
supported format and write the result. :mod:`.base_index` reads a base model's layers from headers
only, for :mod:`.check` (will a LoRA load, and where), :mod:`.fuse` (the base with a LoRA merged in)
and :mod:`.extract` (a LoRA from a base and a tuned model). Nothing here knows an architecture's
layer names: every registered architecture works alike.
"""
