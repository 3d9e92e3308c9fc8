"""The one internal model of a LoRA: named modules, each a kind with its tensors, plus file facts.

Every format is a reader that builds a :class:`LoraModel` and a writer that
consumes one; converters are compositions of the two. Module names are
canonical: a component prefix (``unet``, ``text_encoder``, ``text_encoder_2``)
followed by the diffusers module path, e.g.
``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable

from .kinds import ALL_ROLES, KINDS, AlphaSource, DoraAxis, KindName
from .tensor import Tensor, math_refusal

if TYPE_CHECKING:
    import numpy as np

# The registry's default architecture (lorabridge.architectures.DEFAULT) and its components, in the order
# summaries list them. Spelled out here because the registry imports this module; tests/test_architectures.py
# checks that they agree.
DEFAULT_ARCHITECTURE = "stable-diffusion-xl-v1-base"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def split_key(key: str) -> tuple[str, str] | None:
    """Split a neutral tensor key into (module name, role), or None if it ends in no known role.

    Example:
        >>> split_key("unet.conv_in.lora_A.weight")
        ('unet.conv_in', 'lora_A.weight')
    """
    for role in ALL_ROLES:
        if key.endswith("." + role):
            return key[: -len(role) - 1], role
    return None


def dominant_dtype(dtypes: dict[str, str]) -> str:
    """A module's dtype (spec 5.3): the most common of its tensors' (role -> dtype); a tie goes to the
    dtype of the tensor whose role comes first in UTF-8 byte order, the order of the tensor hash.

    Example:
        >>> dominant_dtype({"lora_B.weight": "F32", "lora_A.weight": "F16"})
        'F16'
    """
    if len(distinct := set(dtypes.values())) == 1:  # nearly every module: no ordering, no count
        return distinct.pop()
    ordered = [dtypes[role] for role in sorted(dtypes, key=lambda role: role.encode("utf-8"))]
    return Counter(ordered).most_common(1)[0][0]


def target_type(name: str) -> str:
    """The module's leaf type, for summaries: the path after its last block index.

    Example:
        >>> target_type("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj")
        'ff.net.0.proj'
    """
    parts = name.split(".")[1:]
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit() and len(parts) - i - 1 >= 2:
            return ".".join(parts[i + 1:])
    return ".".join(parts)


@dataclass
class LoraModule:
    """One adapted layer: ``kind``, tensors by role, ``alpha`` and where alpha came from.

    Example:
        >>> a = Tensor.from_numpy(np.ones((4, 8), "f4")); b = Tensor.from_numpy(np.zeros((16, 4), "f4"))
        >>> m = LoraModule("unet.conv_in", "lora", {"lora_A.weight": a, "lora_B.weight": b}, alpha=4.0)
        >>> m.rank, m.in_features, m.out_features, m.scale
        (4, 8, 16, 1.0)
    """

    name: str
    kind: KindName  # its entry in lorabridge.kinds.KINDS says what its tensors are and mean
    tensors: dict[str, Tensor]
    alpha: float
    alpha_source: AlphaSource = "stored"  # "stored" (read from the file), "user" (given) or "assumed" (= rank: the source has none)
    dora_axis: DoraAxis | None = None  # "out" (per output row, PEFT/LyCORIS default) or "in"
    extra: dict[str, Any] = field(default_factory=dict)  # unknown manifest fields, kept verbatim

    @property
    def component(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def path(self) -> str:
        """The module path inside its component (what PEFT calls the module name)."""
        return self.name.split(".", 1)[1]

    @property
    def rank(self) -> int:
        return KINDS[self.kind].rank(self.tensors)

    @property
    def scale(self) -> float:
        """alpha / rank, the factor applied to the product of the factors (1 when rank is 0)."""
        return self.alpha / self.rank if self.rank else 1.0

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the adapted weight: (out, in) for a linear, (out, in, kh, kw) for a conv."""
        return KINDS[self.kind].weight_shape(self.tensors)

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def kernel_size(self) -> tuple[int, ...] | None:
        return tuple(self.weight_shape[2:]) or None

    @property
    def peft_magnitude_shape(self) -> tuple[int, ...]:
        """PEFT's shape for a DoRA magnitude per output row (``lora_magnitude_vector``): (out,) for a
        linear layer, (1, out, 1, 1) for a conv; this model holds it as (out, 1[, 1, 1])."""
        return (1, self.out_features, 1, 1) if self.kernel_size else (self.out_features,)

    @property
    def dtype(self) -> str:
        return dominant_dtype({role: t.dtype for role, t in self.tensors.items()})

    def delta_weight(self) -> np.ndarray:
        """The float32 weight update this module adds (DoRA magnitude not applied).

        lora: alpha/r * B @ A (conv: over the flattened in*kh*kw axis);
        loha: alpha/r * (w1a @ w1b) * (w2a @ w2b); lokr: scale * kron(w1, w2); full: diff (alpha unused).
        """
        return KINDS[self.kind].delta(self.tensors, self.scale)


def named_tensors(modules: Iterable[LoraModule], roles: Collection[str] | None = None, *,
                  skip: Collection[str] = ()) -> dict[str, Tensor]:
    """The tensors of ``modules`` under their neutral keys ``<module>.<role>``: every role, or those of ``roles``,
    less those in ``skip``. What an operation hands :func:`~lorabridge.tensor.math_refusal`: the tensors its math reads.

    Example:
        >>> m = LoraModule("unet.x", "full", {"diff": Tensor("F16", (1, 1), b"\\0<")}, 1.0)
        >>> list(named_tensors([m])), named_tensors([m], skip=("diff",))
        (['unet.x.diff'], {})
    """
    return {f"{m.name}.{role}": t for m in modules for role, t in m.tensors.items()
            if (roles is None or role in roles) and role not in skip}


def folded_b(module: LoraModule) -> Tensor:
    """A LoRA module's lora_B with alpha / rank folded in, rounded to its own dtype, for formats storing no alpha (their
    scale is 1: MindONE's, old diffusers'); lora_B itself where alpha is the rank. Same delta W, up to that rounding.

    Example:
        >>> one = Tensor("F32", (1, 1), b"\\0\\0\\x80?")
        >>> folded_b(LoraModule("unet.x", "lora", {"lora_A.weight": one, "lora_B.weight": one}, 2.0)).to_numpy().tolist()
        [[2.0]]
    """
    b = module.tensors["lora_B.weight"]
    if module.alpha == module.rank:
        return b
    import numpy as np  # here: a conversion's main thread reaches its first copy while the NaN/Inf scan imports it

    return Tensor.from_numpy(b.to_float32() * np.float32(module.scale), b.dtype)


def fold_refusal(modules: Iterable[LoraModule], operation: str = "folding alpha/rank into lora_B") -> str | None:
    """Why :func:`folded_b` cannot fold the alphas of ``modules`` (those whose alpha is not their rank) into their lora_B,
    as one line (FP8: :func:`~lorabridge.tensor.math_refusal`); None when it can. Writers ask before writing, and
    ``check`` asks on their behalf."""
    folded = [m for m in modules if m.alpha != m.rank]
    return math_refusal(named_tensors(folded, ("lora_B.weight",)), operation)


class Pending:
    """A provenance value still being computed beside the write: the source file's sha256, which
    :func:`lorabridge.converters.convert` hashes in a thread while the LoRA is read and written. A writer that
    stores it (the neutral manifest) writes a placeholder and the value once the data is written
    (:func:`~lorabridge.io.safetensors_file.write_safetensors`' ``late``); :meth:`value` waits for it.

    Example:
        >>> Pending(lambda: "ab" * 32).value()[:4]
        'abab'
    """

    def __init__(self, result: Callable[[], str]):
        self._result = result

    def value(self) -> str:
        return self._result()


@dataclass
class LoraModel:
    """A whole LoRA: modules by canonical name, plus facts every conversion must carry.

    ``training`` is free-form (kohya ``ss_*`` keys, MindONE config...) and survives every conversion.
    ``extra`` keeps unknown top-level manifest fields of newer minor spec versions.
    """

    modules: dict[str, LoraModule] = field(default_factory=dict)
    architecture: str = DEFAULT_ARCHITECTURE
    provenance: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, module: LoraModule) -> None:
        if module.name in self.modules:
            raise ValueError(f"module {module.name} appears twice")
        self.modules[module.name] = module

    @property
    def components(self) -> list[str]:
        present = {m.component for m in self.modules.values()}
        return [c for c in COMPONENTS if c in present] + sorted(present - set(COMPONENTS))

    def tensors(self) -> dict[str, Tensor]:
        """All tensors under their neutral keys ``<module>.<role>``, in module order."""
        return {f"{m.name}.{role}": t for m in self.modules.values() for role, t in m.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for m in self.modules.values() for t in m.tensors.values())

    def summary(self) -> dict[str, Any]:
        """Counts people want to see after a conversion: modules per component, ranks, alphas, bytes."""
        return {
            "modules": len(self.modules),
            "per_component": dict(Counter(m.component for m in self.modules.values())),
            "kinds": dict(Counter(m.kind for m in self.modules.values())),
            "ranks": {str(k): v for k, v in sorted(Counter(m.rank for m in self.modules.values()).items())},
            "alphas": {f"{k:g}": v for k, v in sorted(Counter(m.alpha for m in self.modules.values()).items())},
            "alpha_sources": dict(Counter(m.alpha_source for m in self.modules.values())),
            "dtypes": dict(Counter(t.dtype for m in self.modules.values() for t in m.tensors.values())),
            "tensors": sum(len(m.tensors) for m in self.modules.values()),
            "bytes": self.nbytes,
        }

    def targets(self) -> dict[str, dict[str, int]]:
        """Per component, how many modules of each leaf type (``attn1.to_q``...) are adapted."""
        out: dict[str, Counter] = {}
        for m in self.modules.values():
            out.setdefault(m.component, Counter())[target_type(m.name)] += 1
        return {c: dict(sorted(v.items())) for c, v in out.items()}
