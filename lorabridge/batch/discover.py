"""Finding a batch's inputs: files, directories (walked recursively) and glob patterns.

What counts as an input:

* a path named on the command line is always an input, whatever its name: if it is not a LoRA
  file, its conversion fails with the detector's reason (exactly as ``lorabridge convert`` says it);
* inside a directory (or among a glob's matches) only files with a LoRA container suffix
  (:data:`LORA_SUFFIXES`) and PEFT adapter directories are inputs. A library folder also holds
  previews, READMEs and JSON sidecars: those are not LoRAs and are left alone, not reported. A
  ``.safetensors`` there that is not a LoRA (a base model, a VAE) is reported as failed, with why;
* names starting with ``.`` (lorabridge's temporaries, the batch state, hidden folders) and the
  output directory itself are never walked, so a rerun into ``OUT_DIR`` inside the source tree
  does not pick up its own outputs (``OUT_DIR`` named as a source is a failed input, saying so);
* an entry with a LoRA suffix that is not a regular file (a FIFO, a device, a broken symbolic link)
  is an input too: its conversion fails with what it is, so the report shows that a LoRA-named
  entry was not converted instead of leaving it out.

Symbolic links to directories are followed, each real directory is walked once: a link back to a
parent (``current -> .``) is not walked again, and a glob's ``**`` enters each real directory once
(``glob.glob`` follows such a link until the path is 40 links deep, and two of them in one folder
make 2^40 paths). The walk keeps its own stack, so no depth of folders exhausts Python's recursion.

Each input keeps its path below the deepest folder that holds every source (a directory named counting as
itself, a file or adapter folder named as the folder it is in, a glob as its fixed leading part), which
:mod:`~lorabridge.batch.plan` mirrors under ``OUT_DIR``. One folder named: its contents are mirrored. Several: each
lands under its own name, as ``cp -r a b OUT`` puts them, so that ``batch lib/*`` (the shell's expansion) and
``batch 'lib/*'`` (ours) give one layout (the shell's differs only when one folder matches, as ``cp``'s does), and
a hub mirror's ``repoA/pytorch_lora_weights.safetensors`` and ``repoB/...`` never land on one output.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..architectures import registered_components
from ..converters.registry import get_format

LORA_SUFFIXES = frozenset({".safetensors", ".ckpt", ".bin", ".pt", ".pth"})


@dataclass(frozen=True)
class Found:
    """One input: ``path`` to read, ``relative`` where it sits below the folder holding every source."""

    path: Path
    relative: Path
    error: str | None = None  # why it cannot be converted at all: a glob matching nothing, a folder that cannot be
    # read, OUT_DIR named as a source
    real: str | None = None  # its path with every symbolic link resolved (os.path.realpath), where it names something


def is_adapter_directory(path: Path) -> bool:
    """Whether directory ``path`` is one PEFT adapter input: a folder with adapter_config.json, or a folder of
    per-component adapters (``unet/``, ``text_encoder/``...) that holds nothing else a batch would convert.

    Why the second condition: a library folder that happens to hold a ``unet/`` adapter beside other LoRAs and
    folders of them is a library, and was taken for one adapter whose other files were neither converted nor
    reported. Walked, its ``unet/`` is an input of its own (a PEFT adapter of that component). A folder beside
    the components that holds no LoRA (a model card's ``samples/``) leaves the adapter one input.

    Example:
        >>> is_adapter_directory(Path("/"))
        False
    """
    if not get_format("peft").detect(path):
        return False
    from ..formats.peft import CONFIG_NAME  # (imported by detect above)

    if os.path.lexists(path / CONFIG_NAME):
        return True
    components = registered_components()
    for name in _names(path):
        if name.startswith(".") or (name in components and os.path.lexists(path / name / CONFIG_NAME)):
            continue  # one of the adapter's components (a folder named so without a config is like any other)
        if Path(name).suffix.lower() in LORA_SUFFIXES and not _is_dir(path / name):
            return False  # a LoRA file beside the components: a library
        if _is_dir(path / name) and _holds_inputs(path / name, CONFIG_NAME):
            return False  # a folder of LoRAs beside them
    return True


def _holds_inputs(folder: Path, config_name: str) -> bool:
    """Whether ``folder`` or a folder below it (not hidden, each real one once) holds a LoRA-suffixed file or an
    adapter config (``config_name``): something a walk of it would take as an input. Stops at the first."""
    for current in _folders_below(folder, set()):
        for name in _names(current):
            if not name.startswith(".") and (name == config_name or (
                    Path(name).suffix.lower() in LORA_SUFFIXES and not _is_dir(current / name))):
                return True
    return False


def find_inputs(sources: Sequence[str | os.PathLike], exclude: Iterable[Path] = ()) -> list[Found]:
    """The inputs named by ``sources`` (files, directories, globs), each once, in a stable order.

    ``exclude``: directories never walked (the output directory).

    Example:
        >>> find_inputs(["/no/such/*.safetensors"])[0].error
        'no file matches this pattern'
    """
    excluded = {key for key in map(_directory_key, exclude) if key}
    walked = set(excluded)  # directories walked (or never to be), across all sources
    seen: set[str] = set()
    found: list[_Found] = []
    anchors: list[Path] = []  # each source's folder, found something in it or not (see _below_common_folder)
    for source in sources:
        if _directory_key(source) in excluded:  # else it would name nothing, and the batch say "0 files"
            found.append(_Found(Path(source), None, "is the output directory, which a batch never reads (a rerun "
                                "would convert its own outputs); choose another -o"))
            continue
        anchors += _anchor_of(os.fspath(source))
        for item in _expand(os.fspath(source), walked, excluded):
            key = os.path.realpath(item.path)
            if item.error or key not in seen:
                seen.add(key)
                found.append(replace(item, real=key))
    return _below_common_folder(found, anchors)


def _anchor_of(source: str) -> list[Path]:
    """The folder a source's outputs are counted from whatever it holds today: a folder named (walked), or a glob's
    fixed part. Why even when nothing is found in it: a folder that is empty today, or a glob that matches nothing
    yet, would otherwise move every other source's outputs once it holds a LoRA."""
    path = Path(source)
    if os.path.lexists(path) or not glob.has_magic(source):
        return [path] if _is_dir(path) and not is_adapter_directory(path) else []
    base = _glob_base(source)
    return [base] if _is_dir(base) else []


@dataclass(frozen=True)
class _Found:
    """An input as a source yields it: ``anchor`` is the folder its output path is counted from (a directory named
    or matched, or the folder a named or matched entry is in); None for a source that names nothing there."""

    path: Path
    anchor: Path | None
    error: str | None = None
    real: str | None = None


def _below_common_folder(found: list[_Found], sources: list[Path]) -> list[Found]:
    """Each input with its path below the deepest folder holding every anchor and the ``sources``' own folders
    (compared as absolute paths as given, not resolved: a walk keeps the names of the symbolic links it follows,
    and so does the output tree); a source that names nothing by its name alone."""
    anchors = [os.path.abspath(item.anchor) for item in found if item.anchor is not None]
    anchors += map(os.path.abspath, sources)
    base = os.path.commonpath(anchors) if anchors else ""
    return [Found(item.path, Path(os.path.relpath(os.path.abspath(item.path), base)) if item.anchor is not None
                  else Path(item.path.name), item.error, item.real if item.anchor is not None else None)
            for item in found]


def _expand(source: str, walked: set[tuple[int, int]], excluded: set[tuple[int, int]]) -> Iterator[_Found]:
    path = Path(source)
    if os.path.lexists(path) or not glob.has_magic(source):
        if _is_dir(path) and not is_adapter_directory(path):
            yield from _walk(path, walked)
        else:  # named explicitly: always an input (a missing one fails with "no such file or directory", and being
            # nowhere, it moves no other's output: a mistyped /no/such.ckpt beside lib does not put lib's under out/work).
            # Its folder from its absolute path: ".." (an adapter named from inside it) is a name below that folder.
            yield _Found(path, Path(os.path.abspath(path)).parent if os.path.lexists(path) else None)
        return
    matches = expand_glob(source)
    if not matches:
        yield _Found(path, None, "no file matches this pattern")
    # A glob's matches keep their paths below its fixed part, whichever of them match today: a folder added later
    # that matches too does not move the outputs of those that matched before.
    base, adapters, inside = _glob_base(source), dict[Path, bool](), dict[Path, bool]()
    for match in matches:
        if _in_excluded(match, base, excluded, inside):  # OUT_DIR inside the library: the batch's own outputs
            continue
        match = _adapter_holding(match, base, adapters) or match
        # below the fixed part, as its matches are unless the pattern climbs out of it ("lib/*/../../other/*")
        anchor = base if _under(match, base) else Path(os.path.abspath(match)).parent
        kind = _kind(match)
        if kind == _WALK:
            yield from _walk(match, walked, anchor=anchor)
        elif kind == _INPUT and not match.name.startswith("."):  # a hidden one is matched by ".*", not an input
            yield _Found(match, anchor)


def _under(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies below ``folder``, both made absolute (``..`` taken as written)."""
    return os.path.abspath(path).startswith(os.path.abspath(folder).rstrip(os.sep) + os.sep)


def _in_excluded(match: Path, base: Path, excluded: set[tuple[int, int]], known: dict[Path, bool]) -> bool:
    """Whether ``match`` is, or lies in, a folder never to be read (OUT_DIR) at or below the glob's ``base``, as a
    walk from there would never enter it (one above ``base``, ``-o .`` around the library, is no concern); ``known``
    caches each folder's answer (a glob's matches share them)."""
    top = os.path.abspath(base)
    for folder in (match, *match.parents):
        if not excluded or not (_under(folder, base) or os.path.abspath(folder) == top):
            return False
        if folder not in known:
            known[folder] = _directory_key(folder) in excluded
        if known[folder]:
            return True
    return False


def expand_glob(pattern: str) -> list[Path]:
    """The paths ``pattern`` matches, as ``glob.glob(pattern, recursive=True)`` finds them (wildcards skip names
    starting with ``.`` unless the pattern's part does; ``**`` is any depth of folders), sorted per folder, except
    that ``**`` enters each real directory once (see the module docstring): a file reached by two routes (a link
to a folder beside the folder) is listed by the first.

    Example:
        >>> expand_glob("/no/such/**/*.ckpt")
        []
    """
    path = Path(pattern)
    matches = [Path(path.anchor)] if path.anchor else [Path()]
    parts = path.parts[1:] if path.anchor else path.parts
    for at, part in enumerate(parts):
        if part == "**":
            once: set[tuple[int, int]] = set()
            matches = [folder for match in matches for folder in _folders_below(match, once)]
            if at == len(parts) - 1:  # last: the files in those folders too
                matches += [folder / name for folder in matches for name in _names(folder)
                            if not name.startswith(".") and not _is_dir(folder / name)]
        elif glob.has_magic(part):
            matches = [match / name for match in matches
                       for name in fnmatch.filter(_names(match), part) if part.startswith(".") or not name.startswith(".")]
        else:
            matches = [match / part for match in matches if os.path.lexists(match / part)]
    if pattern.endswith((os.sep, os.altsep or os.sep)):  # "loras/*/": folders only, as in glob
        matches = [match for match in matches if _is_dir(match)]
    return list(dict.fromkeys(matches))  # "a/**/**" reaches a folder twice: glob too lists it once


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:  # not a directory, gone, unreadable: matches nothing, as in glob
        return []


def _folders_below(top: Path, once: set[tuple[int, int]]) -> Iterator[Path]:
    """``top`` and every folder below it, depth-first by name, skipping hidden ones and directories already in ``once``."""
    stack = [top]
    while stack:
        folder = stack.pop()
        key = _directory_key(folder)
        if key is None or key in once:
            continue
        once.add(key)
        yield folder
        stack.extend(folder / name for name in reversed(_names(folder)) if not name.startswith("."))


def _glob_base(pattern: str) -> Path:
    """The directory a glob pattern starts from: its leading parts without wildcards."""
    parts = Path(pattern).parts
    fixed = parts[:next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))]
    return Path(*fixed) if fixed else Path(".")


def _adapter_holding(match: Path, base: Path, known: dict[Path, bool]) -> Path | None:
    """The outermost PEFT adapter folder that holds ``match`` below the glob's ``base``, if one does (``known``
    caches the answers per folder). Why: ``lib/**/*.safetensors`` matches an adapter's ``adapter_model.safetensors``,
    which converted alone had no config, so no alpha (assumed = rank); a walk takes the folder as one input, and so
    does a glob now. A path the pattern names literally (``lib/p/unet/*.safetensors``) is taken as it is."""
    holder = None
    for folder in match.parents:
        if folder == base or len(folder.parts) <= len(base.parts):
            break
        if folder not in known:
            known[folder] = _is_dir(folder) and is_adapter_directory(folder)
        if known[folder]:
            holder = folder
    return holder


def _directory_key(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of the directory ``path`` leads to (through symbolic links), which every route to it shares;
    None if it is not one. Why not ``os.path.realpath``: it resolves the path one part at a time in Python, and a
    walk asking it of every folder of a deep tree takes time growing with the square of the depth (52 s at 1,100)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # gone, a link loop, a NUL in the name
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a directory (through symbolic links); False where it cannot be told (a link loop)."""
    try:
        return path.is_dir()
    except OSError:
        return False


_WALK, _INPUT = "walk", "input"


def _kind(path: Path) -> str | None:
    """What an entry of a folder or a glob's match is: a folder to walk (:data:`_WALK`), an input (:data:`_INPUT`:
    a PEFT adapter folder, or an entry with a LoRA suffix that is not a folder: a file, or something that fails
    to convert as what it is), or neither (None). Asked once per entry: one ``stat``, one adapter detection."""
    if _is_dir(path):
        return _INPUT if is_adapter_directory(path) else _WALK
    return _INPUT if path.suffix.lower() in LORA_SUFFIXES else None


def _walk(directory: Path, walked: set[tuple[int, int]], anchor: Path | None = None) -> Iterator[_Found]:
    """Depth-first, entries sorted by name (a folder's contents where the folder sorts); adapter directories are
    one input and are not entered; a real directory already in ``walked`` is not walked again."""
    stack: list[Iterator[Path]] = []
    folder: Path | None = directory
    while folder is not None or stack:
        if folder is not None:
            key = _directory_key(folder)
            if key not in walked:  # None (gone or unreadable since it was listed) never is: scandir says why
                if key is not None:
                    walked.add(key)
                try:
                    names = sorted(entry.name for entry in os.scandir(folder))
                except OSError as exc:  # reported, not skipped silently
                    yield _Found(folder, anchor or directory, f"cannot read directory: {exc.strerror or exc}")
                else:
                    stack.append(iter([folder / name for name in names if not name.startswith(".")]))
            folder = None
            if not stack:
                continue
        path = next(stack[-1], None)
        if path is None:
            stack.pop()
            continue
        kind = _kind(path)
        if kind == _WALK:
            folder = path
        elif kind == _INPUT:
            yield _Found(path, anchor or directory)
