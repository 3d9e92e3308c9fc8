"""Training facts (kohya ``ss_*``, ``modelspec.*``, trigger words...) in and out of file metadata.

:attr:`LoraModel.training` is free-form and every conversion must carry it (spec section 5.2).
Writers whose container has string metadata (safetensors; MindSpore's safetensors) store it there
with :func:`training_metadata` and their readers take it back with :func:`training_from_metadata`;
writers whose container has no such place (a torch pickle, a MindSpore ``.ckpt``) say that it is
lost with :func:`lost_training`, so the loss is never silent.
"""

from __future__ import annotations

import json
from typing import Collection, Mapping

from ..errors import listed
from ..model import LoraModel

SHOWN_FIELDS = 3  # training fields named in a message
# Metadata a PyTorch-world file carries about itself, never a training fact: the container's ``format``
# and diffusers' alpha config (derived from the modules: each writer writes its own or none).
FILE_METADATA_KEYS = ("format", "lora_adapter_metadata")


def training_metadata(model: LoraModel, reserved: Collection[str] = ()) -> dict[str, str]:
    """The model's training facts as metadata strings (non-strings as JSON), leaving out ``reserved`` keys:
    those the writer's container itself sets (``format``...) or that cannot survive a rewrite.

    Example:
        >>> training_metadata(LoraModel(training={"ss_network_dim": "4", "resolution": [1024, 1024]}))
        {'ss_network_dim': '4', 'resolution': '[1024, 1024]'}
    """
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in model.training.items() if k not in reserved}


def training_from_metadata(metadata: Mapping[str, str], reserved: Collection[str] = ()) -> dict[str, str]:
    """The training facts among a file's metadata: every key but the ``reserved`` ones its format owns.

    Example:
        >>> training_from_metadata({"format": "pt", "ss_output_name": "style"}, reserved=("format",))
        {'ss_output_name': 'style'}
    """
    return {k: v for k, v in metadata.items() if k not in reserved}


def lost_training(model: LoraModel, path, container: str, keep: str, kept: Collection[str] = ()) -> str | None:
    """The message saying that a writer cannot store the model's training facts, or None when there are none.

    ``container`` names what is written (e.g. "a torch pickle"), ``keep`` how the user can keep them;
    ``kept`` lists training keys the writer does store some other way.

    Example:
        >>> lost_training(LoraModel(training={"ss_output_name": "style"}), "x.ckpt", "a torch pickle", "write .safetensors")
        'x.ckpt: 1 training metadata field(s) (ss_output_name) not written: a torch pickle has no place for them; write .safetensors'
    """
    lost = [k for k in model.training if k not in kept]
    if not lost:
        return None
    return (f"{path}: {len(lost)} training metadata field(s) ({listed(lost, SHOWN_FIELDS, ', ')}) not written: "
            f"{container} has no place for them; {keep}")
