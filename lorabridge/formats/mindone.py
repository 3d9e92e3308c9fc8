"""MindONE's SDXL LoRA files: three naming schemes in two MindSpore containers.

MindONE spells the same LoRA three ways, depending on which of its tools wrote it:

- ``mindone-sgm``: the SDXL trainer (``examples/stable_diffusion_xl``), SGM module paths
  (``model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight``,
  ``conditioner.embedders.0/1...`` for the text encoders, bigG's q/k/v fused in ``attn.in_proj``);
- ``mindone-diffusers``: ``mindone.diffusers`` / PEFT (``unet.<diffusers path>.lora_A.weight``);
- ``mindone-kohya``: MindONE's port of kohya sd-scripts (``lora_unet_<SGM path, dots as _>.lora_down.weight``
  with a 0-d ``.alpha``).

Each is a :class:`~lorabridge.naming.mindone_keys.Naming` (:mod:`lorabridge.naming.mindone_keys`) and a
:class:`MindoneFormat` pairs it with a container: the protobuf ``.ckpt`` or MindSpore's
safetensors (metadata ``format`` = ``ms``), detected on read and picked by ``container`` or the
output suffix on write. Tensors are grouped into modules by name, never by position; the modules
then pass the checks every reader applies (:func:`~lorabridge.formats.checks.check_model`: A/B
pairing and ranks, fit to the SDXL-base module shapes, NaN/Inf, zero alphas).

MindONE files (other than kohya ones) carry no alpha; MindONE uses alpha = rank unless told
otherwise, so that is what reading assumes (``alpha`` overrides it) and what writing
preserves: a module whose alpha differs from its rank gets alpha / rank folded into lora_B.

Training facts: a .ckpt's text entries travel together (``training["mindspore_strings"]``) and are
written back as they were; a MindSpore safetensors file's metadata are training facts of their own,
as in the PyTorch-world formats. A safetensors output stores all of them; a .ckpt output only the
text entries, with a warning naming what is lost.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Mapping

from ..architectures.fused import merge_present, split_fused
from ..architectures.sdxl import SDXL
from ..errors import LoraBridgeError, listed
from ..io.ms_ckpt import is_ms_checkpoint, iter_ms_tags, read_ms_checkpoint, write_ms_checkpoint
from ..io.ms_safetensors import read_ms_safetensors, write_ms_safetensors
from ..io.safetensors_file import SafetensorsFile
from ..kinds import DoraAxis, KindName
from ..manifest import MANIFEST_KEY
from ..model import LoraModel, LoraModule, fold_refusal, folded_b, target_type
from ..naming.mindone_keys import LORA_SUFFIXES, NAMINGS, A, B, Naming
from ..naming.peft_config import adapter_metadata, metadata_alpha
from ..naming.underscored import ALPHA, ModuleProblem
from ..rules import module_problems
from ..tensor import Tensor, made_late
from .checks import check_model, warn, warn_user_alpha, writable_lora
from .contract import FOREIGN_READ, READ_DEFAULTS, WRITE_DEFAULTS, DeclaredFormat, Progress, ReadOptions, WriteOptions
from .peft_modules import stored_alpha
from .training import lost_training, training_from_metadata, training_metadata
from .underscored_files import alpha_of, alpha_tensor


# Where MindSpore str entries / safetensors metadata of the source file travel, so a round trip keeps them.
STRINGS_KEY = "mindspore_strings"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # PEFT LoraConfig per component, as diffusers writes it
# Tag prefixes of training state that sits beside LoRA weights in a MindSpore training checkpoint.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accum.", "ema.")
# What MindONE's own SDXL LoRA model wraps in a LoRA layer (examples/stable_diffusion_xl at 831bcaf1:
# UNetModel_lora in gm/modules/diffusionmodules/openaimodel.py, FrozenCLIPEmbedder_lora and
# FrozenOpenCLIPEmbedder2_lora in gm/modules/embedders/modules.py), as module path endings per component.
# Its load_pretrained loads a file with load_param_into_net(strict_load=False), so a LoRA on any other
# module (bigG's fused attn.in_proj is a bare parameter there, not a layer) is dropped without effect.
MINDONE_SDXL_LORA_LAYERS = {
    "unet": tuple(f".{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")),
    "text_encoder": tuple(f".self_attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj")),
    "text_encoder_2": (".self_attn.out_proj",),
}


# --- containers ---------------------------------------------------------------------------------
CONTAINERS = ("ckpt", "safetensors")
MS_SAFETENSORS_FORMATS = ("ms", "np")  # ``format`` metadata of MindSpore's and mindone.diffusers' safetensors
CONTAINER_KEYS = ("format", "crc_num")  # safetensors metadata that belongs to the container, not to the LoRA


def container_of(path: str | os.PathLike) -> str | None:
    """"ckpt" or "safetensors" for a MindSpore/MindONE file, None otherwise (cheap: first bytes / header)."""
    if is_ms_checkpoint(path):
        return "ckpt"
    try:
        fmt = SafetensorsFile(path).metadata.get("format")
    except LoraBridgeError:
        return None
    return "safetensors" if fmt in MS_SAFETENSORS_FORMATS else None


@lru_cache(maxsize=8)
def _naming_of(path: str, _mtime_ns: int, _size: int) -> str | None:
    """The first naming with a LoRA key in the file (cached per file version: detection asks once per format)."""
    container = container_of(path)
    if container is None:
        return None
    keys = iter_ms_tags(path) if container == "ckpt" else SafetensorsFile(path).keys()  # stops at the first LoRA key
    for key in keys:
        for naming in NAMINGS.values():
            if naming.split_key(key):
                return naming.name
    return None


def naming_of(path: str | os.PathLike) -> str | None:
    """"sgm", "diffusers" or "kohya" for a MindSpore file with LoRA keys in that naming, else None (never raises).

    Example:
        >>> naming_of("sdxl_lora.ckpt")   # doctest: +SKIP
        'sgm'
    """
    try:
        stat = os.stat(path)
        return _naming_of(os.fspath(path), stat.st_mtime_ns, stat.st_size) if Path(path).is_file() else None
    except (OSError, LoraBridgeError):
        return None


def _read_container(path: Path) -> tuple[str, dict[str, Tensor], dict[str, str]]:
    container = container_of(path)
    if container == "ckpt":
        tensors, strings = read_ms_checkpoint(path)
    elif container == "safetensors":
        tensors, strings = read_ms_safetensors(path)
        strings = {k: v for k, v in strings.items() if k not in CONTAINER_KEYS}
    else:
        raise LoraBridgeError(why_not_mindone(path), path)
    return container, tensors, strings


def why_not_mindone(path: str | os.PathLike) -> str:
    """Why no MindONE format accepts ``path``: what the file is instead, or the container's own error
    (truncated, encrypted, CRC mismatch, a PyTorch pickle... raised as :class:`LoraBridgeError`).

    Example:
        >>> why_not_mindone("lora_pt.safetensors")   # doctest: +SKIP
        "a safetensors file with format='pt', not one written by MindSpore/MindONE: use pt2neutral or convert"
    """
    path = Path(path)
    container = container_of(path)
    if container is None:
        try:
            metadata = SafetensorsFile(path).metadata
        except LoraBridgeError:
            read_ms_checkpoint(path)  # raises the container's precise error
            return "not a MindSpore checkpoint"
        if MANIFEST_KEY in metadata:
            return "already a neutral LoRA file (neutral2ms writes MindONE files from it)"
        return (f"a safetensors file with format={metadata.get('format')!r}, not one written by MindSpore/MindONE: "
                "use pt2neutral or convert")
    _, tensors, _ = _read_container(path)
    sample = ", ".join(list(tensors)[:3]) or "none"
    return (f"a MindSpore {container} file with {len(tensors)} tensor(s) but no LoRA tensor in any MindONE naming "
            f"(sgm, diffusers, kohya); first keys: {sample}")


# --- reading ------------------------------------------------------------------------------------
def _raise_problems(problems: list[str], what: str, path) -> None:
    if problems:
        raise LoraBridgeError(f"{len(problems)} {what}: {listed(problems, 5)}", path)


def _made(module: LoraModule | Callable[[], LoraModule]) -> LoraModule:
    """A module as :meth:`MindoneFormat._spelled_modules` gives it: as it is, or merged now."""
    return module if isinstance(module, LoraModule) else module()


@dataclass(frozen=True)
class MindoneFormat:
    """A MindONE naming in a MindSpore container, with the registry's ``detect``/``read``/``write``."""

    naming: Naming

    def detect(self, path: str | os.PathLike) -> bool:
        """True for a MindSpore .ckpt or safetensors file whose first LoRA key is of this naming."""
        return naming_of(path) == self.naming.name

    def read(self, path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
        """Read the LoRA tensors of a MindONE file into a :class:`LoraModel`, pairing A and B by name.

        ``options.alpha``: alpha of every module without a stored one (default: its rank, MindONE's default,
        recorded as "assumed"). ``options.skip_unknown``: drop LoRA tensors that name no SDXL module (with a
        warning) instead of failing. Non-LoRA tensors (base weights, optimizer state) are ignored, with
        a warning saying how many. NaN/Inf values are warned about (``options.strict``: refused).

        Example:
            >>> model = MINDONE_SGM.read("sdxl_lora.ckpt", ReadOptions(alpha=8))   # doctest: +SKIP
        """
        alpha, skip_unknown, strict = options.alpha, options.skip_unknown, options.strict
        path = Path(path)
        container, tensors, strings = _read_container(path)
        groups: dict[tuple[str, tuple[str, ...]], dict[str, Tensor]] = {}
        unknown: list[str] = []
        ignored = 0
        for key, tensor in tensors.items():
            parts = self.naming.split_key(key) if not key.startswith(OPTIMIZER_PREFIXES) else None
            if parts is None and (key.startswith(OPTIMIZER_PREFIXES) or not key.endswith(LORA_SUFFIXES)):
                ignored += 1
                continue
            names = self.naming.parse(parts[0]) if parts else None
            if parts is None or names is None:
                unknown.append(key)
                continue
            groups.setdefault((parts[0], names), {})[parts[1]] = tensor
        if unknown and not skip_unknown:
            _raise_problems(unknown, f"LoRA tensor(s) name no SDXL-base module in MindONE {self.naming.name} naming"
                                     " (--skip-unknown drops them)", path)
        if unknown:
            warn(f"{path}: dropped {len(unknown)} LoRA tensor(s) naming no SDXL module: "
                 f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        if ignored:
            warn(f"{path}: ignored {ignored} non-LoRA tensor(s) (base weights or training state); "
                 f"kept {sum(len(g) for g in groups.values())} LoRA tensors")
        config_alpha_of = metadata_alpha({ADAPTER_METADATA_KEY: strings.pop(ADAPTER_METADATA_KEY, "")}, path)
        model = LoraModel(training=_training_of(container, strings))
        _raise_problems(_named_twice(groups), "module(s) named twice (two spellings of one module)", path)
        problems: list[str] = []
        for (key, names), roles in groups.items():
            module = LoraModule(names[0] if len(names) == 1 else key, "lora", {r: t for r, t in roles.items() if r != ALPHA}, 0.0)
            if module_problems(module):  # missing or misfitting factors: check_model names them (the shared rules)
                model.add(module)
                continue
            rank = module.rank
            try:
                stored = stored_alpha(config_alpha_of, names[0], rank, path)
                if stored is not None:
                    module.alpha, module.alpha_source = stored, "stored"
                else:  # kohya's rule: the stored .alpha, else the user's, else the rank
                    module.alpha, module.alpha_source, module.extra = alpha_of(roles, rank, alpha)
            except ModuleProblem as exc:
                problems.append(f"{key}: {exc}")
                continue
            if len(names) == 3 and roles[B].shape[0] % 3:
                problems.append(f"{key}: fused q/k/v lora_B has {roles[B].shape[0]} rows, not a multiple of 3")
                continue
            for part in (split_fused(module, names) if len(names) == 3 else [module]):
                model.add(part)
        _raise_problems(problems, "broken LoRA module(s)", path)
        if not model.modules:
            raise LoraBridgeError(f"no LoRA modules in MindONE {self.naming.name} naming", path)
        warn_user_alpha(model, alpha, path)
        return check_model(model, path, skip_unknown=skip_unknown, strict=strict)

    # --- writing ------------------------------------------------------------------------------
    def file_tensors(self, model: LoraModel, path, fold_alpha: bool = True, alpha_in_metadata: bool = False
                     ) -> tuple[dict[str, Tensor], list[str]]:
        """The tensors of ``model`` under this naming's keys, in module order, plus warnings.

        bigG q/k/v are merged back into the fused projection where the naming fuses them. Without
        a place for alpha (no ``.alpha`` role, no adapter metadata), a module with alpha != rank gets
        alpha / rank folded into lora_B when ``fold_alpha`` (delta W kept at MindONE's alpha = rank).
        """
        makers, unspellable = self._spelled_modules(model)
        _raise_problems(unspellable, f"module(s) with no name in MindONE {self.naming.name} naming", path)
        tensors: dict[str, Tensor] = {}
        fold = False  # decided below, once every module's alpha is known; folding changes no dtype or shape

        def module_tensors(key: str, m: LoraModule) -> dict[str, Tensor]:
            out = {f"{key}.{self.naming.suffix(A)}": m.tensors[A], f"{key}.{self.naming.suffix(B)}": folded_b(m) if fold else m.tensors[B]}
            if self.naming.stores_alpha and m.alpha_source != "assumed":
                out[f"{key}.{self.naming.suffix(ALPHA)}"] = alpha_tensor(m)
            return out

        def made_tensors(key: str, make: Callable[[], LoraModule]) -> dict[str, Tensor]:
            return module_tensors(key, make())

        # a merge is made here once (its alpha, its tensors' dtypes and shapes), then let go: only the scales a fold
        # would apply are kept, and the modules it could not scale (refused below, all named)
        unscaled, unfoldable, specs = [], [], {}
        may_fold = fold_alpha and not (self.naming.stores_alpha or alpha_in_metadata)
        for key, make in makers.items():
            try:
                m = _made(make)
            except LoraBridgeError as exc:  # merging q/k/v (architectures.fused), which knows no file
                raise LoraBridgeError(exc.message, exc.path or path) from None
            if m.alpha != m.rank:
                unscaled.append(m.scale)
                if may_fold and fold_refusal([m]):
                    unfoldable.append(m)
            if m is not make:
                specs[key] = {name: (t.dtype, t.shape) for name, t in module_tensors(key, m).items()}
        fold = may_fold and bool(unscaled)
        refusal = fold_refusal(unfoldable)
        if refusal:
            raise LoraBridgeError(f"{refusal}; neutral2ms --no-fold-alpha writes lora_B unscaled", path)
        made: dict = {}  # merged q/k/v are made again as they are written, one at a time (made_late)
        for key, make in makers.items():
            if isinstance(make, LoraModule):
                tensors.update(module_tensors(key, make))
            else:
                tensors.update(made_late(partial(made_tensors, key, make), made, specs[key]))
        notes = []
        if unscaled and not (self.naming.stores_alpha or alpha_in_metadata):
            ratios = ", ".join(f"{r:g}" for r in sorted(set(unscaled)))
            notes.append(f"{len(unscaled)} module(s) have alpha != rank (alpha/rank {ratios}) and MindONE files carry no "
                         + ("alpha: folded alpha/rank into lora_B, so MindONE's default alpha = rank gives the same delta W"
                            if fold else "alpha: load them with lora_alpha set to match, or drop --no-fold-alpha"))
        return tensors, notes

    def _spelled_modules(self, model: LoraModel) -> tuple[dict[str, LoraModule | Callable[[], LoraModule]], list[str]]:
        """Modules under their file module keys, and the names with no key; fused q/k/v as a call that merges
        them (made when needed, so merged layers are not all held at once)."""
        order: dict[str, None] = {}  # module keys in the order of their first module
        whole: dict[str, LoraModule] = {}
        fused: dict[str, dict[int, LoraModule]] = {}
        unspellable = []
        for m in model.modules.values():
            spelling = self.naming.spell(m.name)
            if spelling is None:
                unspellable.append(m.name)
                continue
            key, block = spelling
            order.setdefault(key)
            if block is None:
                whole[key] = m
            else:
                fused.setdefault(key, {})[block] = m
        equal = (1, 1, 1)  # bigG's q, k and v have the same output size
        return {key: whole[key] if key in whole else partial(merge_present, fused[key], key, equal) for key in order}, unspellable

    def write(self, model: LoraModel, path: str | os.PathLike, options: WriteOptions = WRITE_DEFAULTS, *,
              progress: Progress | None = None, force: bool = False) -> None:
        """Write ``model`` as a MindONE file (atomically); what the user should know is warned about.

        ``options.container``: "ckpt" or "safetensors" (default: by the suffix of ``path``); ``options.crc``: add
        MindSpore's checksum (the ``crc_num`` trailer of a .ckpt, or metadata of a safetensors file);
        ``options.fold_alpha``: see :meth:`file_tensors`. Tensors keep their dtype.

        Example:
            >>> MINDONE_SGM.write(model, "lora_ms.ckpt", WriteOptions(crc=True))   # doctest: +SKIP
        """
        container = options.container or ("safetensors" if Path(path).suffix == ".safetensors" else "ckpt")
        if container not in CONTAINERS:
            raise LoraBridgeError(f"unknown MindSpore container {container!r}; choose ckpt or safetensors", path)
        alpha_in_metadata = container == "safetensors" and self.naming.name == "diffusers"
        model = writable_lora(model, path, WriteOptions(bake_to_lora=options.bake_to_lora, strict=options.strict),
                              target=f"MindONE {self.naming.name}", kinds=MINDONE_KINDS, dora_axes=MINDONE_DORA_AXES)
        tensors, notes = self.file_tensors(model, path, options.fold_alpha, alpha_in_metadata)
        notes += filter(None, [self._ineffective_in_mindone(model)])
        strings = _source_strings(model, path)
        if container == "ckpt":
            notes += filter(None, [lost_training(model, path, "a MindSpore .ckpt written by lorabridge (it keeps only the "
                                                 "source checkpoint's own text entries)", "--format safetensors keeps them",
                                                 kept=(STRINGS_KEY,))])
            write_ms_checkpoint(path, tensors, metadata=strings, crc=options.crc, progress=progress)
        else:
            metadata = {**training_metadata(model, (STRINGS_KEY, *CONTAINER_KEYS, ADAPTER_METADATA_KEY)), **strings}
            if alpha_in_metadata:
                metadata[ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata(model), separators=(",", ":"))
            write_ms_safetensors(path, tensors, metadata=metadata, crc=options.crc, progress=progress)
        for note in notes:
            warn(note)

    def _ineffective_in_mindone(self, model: LoraModel) -> str | None:
        """The warning that MindONE's SDXL LoRA model ignores some modules of an SGM file, or None.

        Only the SGM naming is loaded by that model (through its ``load_pretrained``); the modules are
        still written, since ``ms2neutral`` reads them back, and mindone.diffusers applies them all.
        """
        if self.naming.name != "sgm":
            return None
        spellings = {m.name: self.naming.spell(m.name) for m in model.modules.values()
                     if not m.path.endswith(MINDONE_SDXL_LORA_LAYERS.get(m.component, ()))}
        keys = {spelling[0]: model.modules[name].component for name, spelling in spellings.items() if spelling}
        if not keys:
            return None
        groups = Counter(f"{component} {target_type(key)}" for key, component in keys.items())
        counts = ", ".join(f"{group} x{n}" for group, n in sorted(groups.items()))
        return (f"{len(keys)} module(s) have no LoRA layer in MindONE's SDXL LoRA model (examples/stable_diffusion_xl: "
                "UNet attention to_q/k/v/out, CLIP-L self_attn q/k/v/out_proj, bigG attn.out_proj only), whose "
                f"load_pretrained drops them without a word (load_param_into_net, strict_load=False): {counts}. "
                "They are written for ms2neutral and other readers; --naming mindone-diffusers keeps them effective "
                "(mindone.diffusers load_lora_weights applies every module)")


def _training_of(container: str, strings: dict[str, str]) -> dict:
    """A MindONE file's training facts: a .ckpt's text entries kept together (written back as they were),
    a safetensors file's metadata as facts of their own (as the PyTorch-world formats read theirs)."""
    if container == "ckpt":
        return {STRINGS_KEY: strings} if strings else {}
    return training_from_metadata(strings)


def _source_strings(model: LoraModel, path) -> dict[str, str]:
    """The source .ckpt's text entries, from the model or from their JSON text (a trip through a format
    that stores training facts as strings turns the dict into JSON)."""
    strings = model.training.get(STRINGS_KEY) or {}
    try:
        strings = json.loads(strings) if isinstance(strings, str) else strings
    except json.JSONDecodeError:
        strings = None
    if not isinstance(strings, dict) or not all(isinstance(v, str) for v in strings.values()):
        raise LoraBridgeError(f"training fact {STRINGS_KEY!r} is not an object of strings", path)
    return dict(strings)


def _named_twice(groups: Mapping[tuple[str, tuple[str, ...]], object]) -> list[str]:
    """Modules that two module keys of a file name (e.g. SGM and diffusers spelling of one UNet layer)."""
    seen: dict[str, str] = {}
    problems = []
    for key, names in groups:
        for name in names:
            if name in seen:
                problems.append(f"{name}: both {seen[name]!r} and {key!r}")
            seen.setdefault(name, key)
    return problems


# The registered formats (converters/registry.py points at these objects).
MINDONE_KINDS: tuple[KindName, ...] = ("lora",)  # what MindONE's LoRA layers hold: other kinds are baked or refused
MINDONE_DORA_AXES: tuple[DoraAxis, ...] = ()  # MindONE's LoRA layers have no DoRA
MINDONE_WRITE = frozenset({"container", "crc", "bake_to_lora", "strict"})  # tensors keep their dtype


def _declared(naming: Naming, name: str, description: str, architectures: tuple[str, ...] | None = (SDXL.name,)) -> DeclaredFormat:
    """The registered format of one naming: the methods of its :class:`MindoneFormat` and what they do."""
    mindone = MindoneFormat(naming)
    return DeclaredFormat(
        name=name, framework="mindspore", description=description, detect=mindone.detect, read=mindone.read,
        write=mindone.write, stores_metadata=False,  # a .ckpt, the default container, keeps only its source's text entries
        stores_alpha=naming.stores_alpha, kinds=MINDONE_KINDS, dora_axes=MINDONE_DORA_AXES, read_options=FOREIGN_READ,
        write_options=MINDONE_WRITE | ({"fold_alpha"} if not naming.stores_alpha else set()),  # nothing to fold where .alpha is
        architectures=architectures)  # SGM and MindONE's kohya port are SDXL's tables; diffusers paths fit any


MINDONE_SGM = _declared(NAMINGS["sgm"], "mindone-sgm", "MindONE SDXL trainer LoRA: SGM names (model.diffusion_model.*, "
                        "conditioner.embedders.*), .ckpt or MindSpore safetensors")
MINDONE_DIFFUSERS = _declared(NAMINGS["diffusers"], "mindone-diffusers", "mindone.diffusers LoRA: PEFT names "
                              "(unet.*.lora_A.weight; transformer.* for Flux.1) in a .ckpt or MindSpore safetensors",
                              architectures=None)
MINDONE_KOHYA = _declared(NAMINGS["kohya"], "mindone-kohya", "MindONE's kohya port: lora_unet_*/lora_te1_*/lora_te2_* "
                          "with .alpha, .ckpt or MindSpore safetensors")

