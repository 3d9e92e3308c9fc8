"""The contract every format keeps: the facts it declares about itself, and the typed options it takes.

A format is an object satisfying :class:`Format` (as :class:`~lorabridge.adapters.pipeline.Framework`
is for the inference backends): ``detect``, ``read`` and ``write`` (None for a read-only format: a layout
lorabridge reads from a tool but does not write, such as XLabs' or OneTrainer's Flux files), plus declarations that the
converters, the refusals and the tests read instead of probing modules (``getattr(module,
"WRITES_DIRECTORY", False)``) or repeating facts by hand. Every format module builds its object
as a :class:`DeclaredFormat` from its functions (MindONE's from the bound methods of one object
per naming), so declarations sit beside the code that makes them true, in one shape; the
registry (:mod:`lorabridge.converters.registry`) lists where each lives.
``tests/test_format_contract.py`` checks each declaration against what the format does.

Readers and writers take their options as :class:`ReadOptions`/:class:`WriteOptions` (never
``**options``), and each honours only the fields it declares in ``read_options``/``write_options``:
the converter refuses a given option that neither side of a conversion honours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Protocol

from ..kinds import DoraAxis, KindName
from ..model import LoraModel

Progress = Callable[[int], None]  # called with the bytes written since the last call


@dataclass(frozen=True)
class ReadOptions:
    """Options a reader may honour, with their defaults (a default value counts as not given)."""

    alpha: float | None = None  # alpha of modules whose file stores none (recorded as "user")
    skip_unknown: bool = False  # drop tensors/modules that name no SDXL layer, with a warning
    strict: bool = False  # refuse NaN/Inf instead of warning
    verify_hash: bool = False  # check a neutral file's tensor_sha256 first


@dataclass(frozen=True)
class WriteOptions:
    """Options a writer may honour, with their defaults (a default value counts as not given)."""

    dtype: str | None = None  # fp32/fp16/bf16: cast the tensors
    bake_to_lora: int | None = None  # LoHa/LoKr -> plain LoRA of this rank
    strict: bool = False  # refuse NaN/Inf instead of warning
    container: str | None = None  # MindSpore container: ckpt or safetensors
    crc: bool = False  # MindSpore's checksum
    fold_alpha: bool = True  # fold alpha/rank into lora_B where the file cannot store alpha
    factor_names: str | None = None  # ComfyUI's spelling of the pair: "lora_up" (lora_up/lora_down) or "lora_A" (lora_A/lora_B)


READ_DEFAULTS = ReadOptions()
WRITE_DEFAULTS = WriteOptions()
READ_OPTIONS = frozenset(f.name for f in fields(ReadOptions))
WRITE_OPTIONS = frozenset(f.name for f in fields(WriteOptions))
OPTION_DEFAULTS: dict[str, Any] = {f.name: f.default for cls in (ReadOptions, WriteOptions) for f in fields(cls)}

# Option sets several formats honour alike (tests/test_format_options.py checks each format's against behaviour).
FOREIGN_READ = frozenset({"alpha", "skip_unknown", "strict"})  # every non-neutral reader: alpha, SDXL fit, NaN check
PLAIN_LORA_WRITE = frozenset({"dtype", "bake_to_lora", "strict"})  # writers of LoRA-only files (other kinds baked)


class Detector(Protocol):
    def __call__(self, path: str | os.PathLike) -> bool: ...


class Reader(Protocol):
    def __call__(self, path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel: ...


class Writer(Protocol):
    def __call__(self, model: LoraModel, path: str | os.PathLike, options: WriteOptions = WRITE_DEFAULTS, *,
                 progress: Progress | None = None, force: bool = False) -> None: ...


class Format(Protocol):
    """A LoRA file layout lorabridge reads (and, unless read-only, writes), and what it declares about itself.

    ``detect(path)`` is cheap (header or key names only). ``read`` returns a checked model and
    ``write`` writes one, atomically (``write`` is None and ``writable`` False for a read-only format,
    which the converter refuses as a target with one line; its ``write_options`` are empty and its
    ``stores_*``/``kinds``/``dora_axes`` describe the files it reads); both report what the user should know as
    :class:`~lorabridge.errors.LoraBridgeWarning` (the converter collects them) and return nothing else.
    ``force`` lets ``write`` replace an existing output: a directory writer needs it, file
    writers publish by :func:`lorabridge.io.atomic.replacing`, which the converter sets from it.
    """

    @property
    def name(self) -> str: ...  # the registry's name, what ``--to``/``--format`` take
    @property
    def framework(self) -> str: ...  # "neutral", "mindspore" or "torch": which world uses it
    @property
    def description(self) -> str: ...
    @property
    def writable(self) -> bool: ...  # False: read-only, ``write`` is None
    @property
    def writes_directory(self) -> bool: ...  # the output path is a directory, not a file
    @property
    def stores_metadata(self) -> bool: ...  # training facts survive a write and a read (default container)
    @property
    def stores_alpha(self) -> bool: ...  # an alpha != rank is stored, not folded into the factors
    @property
    def records_source_hash(self) -> bool: ...  # provenance keeps the source file's sha256
    @property
    def kinds(self) -> tuple[KindName, ...]: ...  # module kinds written as they are (others baked or refused)
    @property
    def dora_axes(self) -> tuple[DoraAxis, ...]: ...  # DoRA magnitude axes it stores ("out": per row, "in": per column)
    @property
    def architectures(self) -> tuple[str, ...] | None: ...  # base models it names layers of; None: every registered one
    @property
    def read_options(self) -> frozenset[str]: ...  # the ReadOptions fields its read() honours
    @property
    def write_options(self) -> frozenset[str]: ...  # the WriteOptions fields its write() honours

    def detect(self, path: str | os.PathLike) -> bool: ...
    def read(self, path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel: ...
    @property
    def write(self) -> Writer | None: ...  # None: a read-only format


class WritableFormat(Format, Protocol):
    """A :class:`Format` that writes (``writable``): what :func:`~lorabridge.converters.registry.get_writer` returns."""

    @property
    def write(self) -> Writer: ...


@dataclass(frozen=True, kw_only=True)
class DeclaredFormat:
    """A :class:`Format` built from its declarations and its functions: how each format module states it.

    A read-only format gives no ``write`` (and so no ``write_options``): ``writable`` is then False.

    Example:
        >>> from lorabridge.formats.kohya import FORMAT
        >>> FORMAT.name, FORMAT.kinds, FORMAT.dora_axes, FORMAT.writes_directory, FORMAT.writable
        ('kohya', ('lora', 'full'), ('out', 'in'), False, True)
    """

    name: str
    framework: str
    description: str
    detect: Detector
    read: Reader
    write: Writer | None
    stores_metadata: bool
    stores_alpha: bool
    kinds: tuple[KindName, ...]
    dora_axes: tuple[DoraAxis, ...]
    read_options: frozenset[str]
    write_options: frozenset[str]
    writes_directory: bool = False
    records_source_hash: bool = False
    architectures: tuple[str, ...] | None = None  # None: keys are diffusers paths, so every registered architecture

    @property
    def writable(self) -> bool:
        """Whether lorabridge writes this format (False: read-only)."""
        return self.write is not None

    def __post_init__(self) -> None:
        unknown = (self.read_options - READ_OPTIONS) | (self.write_options - WRITE_OPTIONS)
        if unknown:
            raise ValueError(f"format {self.name!r} declares unknown option(s): {', '.join(sorted(unknown))}")
        if self.write is None and (self.write_options or self.writes_directory or self.records_source_hash):
            raise ValueError(f"read-only format {self.name!r} declares facts about writing")
