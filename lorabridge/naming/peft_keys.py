"""PEFT's tensor key grammar: ``<module path>.lora_A[.<adapter>].weight`` and its kin.

PEFT names a LoRA tensor after the module it wraps, inside ``base_model.model.``
when saved from a ``PeftModel`` (``base_model.model.down_blocks.0.conv1.lora_A.weight``),
with the adapter name inside the key when taken from a live model's
``state_dict()`` (``lora_A.default.weight``). The PEFT adapter format, the diffusers format
(the same keys behind a pipeline-component prefix, see :mod:`.diffusers_keys`) and
mindone.diffusers files all spell keys so; alpha lives in a LoraConfig (:mod:`.peft_config`).
"""

from __future__ import annotations

import re
from functools import lru_cache

from . import PARSED_KEYS_KEPT

PEFT_PREFIX = "base_model.model."
# PEFT key tail -> neutral role. The adapter name, when present, sits before ".weight".
_KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<factor>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
                  r"|(?P<magnitude>lora_magnitude_vector)(?:\.(?P<adapter_m>(?!weight$)[^.]+))?(?:\.weight)?)$")
ROLES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude_vector": "dora_scale"}
PEFT_ROLES = {role: peft for peft, role in ROLES.items()}


@lru_cache(maxsize=PARSED_KEYS_KEPT)  # the diffusers and PEFT detectors scan every key of a file in another format
def parse_key(key: str) -> tuple[str, str, str | None] | None:
    """(module path, neutral role, adapter name or None) of a PEFT tensor key, or None if it is not one.

    Example:
        >>> parse_key("down_blocks.0.resnets.0.conv1.lora_A.default.weight")
        ('down_blocks.0.resnets.0.conv1', 'lora_A.weight', 'default')
    """
    match = _KEY.match(key)
    if not match:
        return None
    peft_role = match["factor"] or match["magnitude"]
    return match["module"], ROLES[peft_role], match["adapter"] or match["adapter_m"]


# A key parser's answer: (component, or None to infer it from the tree; module path; neutral role; adapter name).
Parsed = tuple[str | None, str, str, str | None]
