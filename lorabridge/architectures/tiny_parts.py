"""What every tiny pipeline builder shares: tokenizers built offline, CLIP configs, random LoRAs.

The tiny pipelines (``<architecture>/tiny.py``, named by :attr:`Architecture.tiny`) must be built
without a download, so their tokenizers are made here from a few lines of data: CLIP's byte-level
BPE (SDXL's two encoders, Flux.1's CLIP-L) and a T5-style unigram tokenizer (Flux.1's T5), saved as
``T5TokenizerFast`` (``tokenizer.json``), which transformers loads for diffusers and mindone.diffusers alike.

Example:
    >>> tokenizer_vocab()[-2:]
    ['<|startoftext|>', '<|endoftext|>']
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import LoraBridgeError
from ..io.atomic import atomic_directory

# A byte-level BPE vocabulary in CLIP's layout: 256 byte symbols, the same with "</w>", merges, specials.
TOKENIZER_MERGES = ["t h", "th e</w>", "a n", "i n", "e r", "o n", "a r", "e n", "o r", "a </w>",
                    "s </w>", "e </w>", "t </w>", "d </w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>",
                    "c a", "ca t</w>", "d o", "do g</w>", "b l", "bl u", "blu e</w>", "r e", "re d</w>"]
VOCAB_SIZE = 1000


def _bytes_to_unicode() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tokenizer_vocab() -> list[str]:
    """The tokens by id; the last two are ``<|startoftext|>`` and ``<|endoftext|>``, as in CLIP."""
    symbols = _bytes_to_unicode()
    return [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in TOKENIZER_MERGES),
            "<|startoftext|>", "<|endoftext|>"]


def write_tokenizer_files(directory: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of a tiny CLIP BPE tokenizer (every byte is covered)."""
    vocab = tokenizer_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TOKENIZER_MERGES) + "\n", "utf-8")


def clip_tokenizer() -> Any:
    """The tiny CLIP tokenizer (transformers ``CLIPTokenizer``, 77 tokens), built from :func:`write_tokenizer_files`."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


def clip_text_config(config: dict[str, Any]) -> Any:
    """A ``CLIPTextConfig`` for the tiny CLIP tokenizer; ``config`` may override any field, ``vocab_size`` included.

    The pooled output is read at ``eos_token_id``, so it must be the tokenizer's real id.
    """
    from transformers import CLIPTextConfig

    bos, eos = len(tokenizer_vocab()) - 2, len(tokenizer_vocab()) - 1
    return CLIPTextConfig(**{"vocab_size": VOCAB_SIZE, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
                             **config})


# A T5-style unigram vocabulary: T5's three specials at T5's ids (pad 0, eos 1, unk 2), a few whole words
# (so prompts are not all single letters), then every printable ASCII character, each also word-initial.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_WORDS = ("a", "photo", "of", "cat", "dog", "the", "blue", "red", "in", "on", "with", "and")
T5_CHARACTERS = string.ascii_letters + string.digits + string.punctuation
T5_VOCAB_SIZE = 256  # the tiny T5's embedding rows (the vocabulary has fewer tokens)


def t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) by id: longer pieces score higher, so whole words win over letters."""
    pieces = [*(f"▁{w}" for w in T5_WORDS), "▁", *T5_CHARACTERS, *(f"▁{c}" for c in T5_CHARACTERS)]
    return [*((s, 0.0) for s in T5_SPECIALS), *((p, -20.0 / len(p)) for p in pieces)]


def t5_tokenizer(max_length: int = 512) -> Any:
    """The tiny T5 tokenizer as transformers' ``T5TokenizerFast`` (what Flux.1's ``tokenizer_2`` is), offline.

    Built as T5's own ``tokenizer.json`` is: a unigram model, Metaspace pre-tokenizer (``▁`` marks a
    word start), ``</s>`` appended to every sequence.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram(t5_vocab(), unk_id=T5_SPECIALS.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", T5_SPECIALS.index("</s>"))])
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def weight_shapes(pipeline_dir: str | os.PathLike, weight_files: dict[str, str], targets: dict[str, tuple[str, ...]],
                  components: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Canonical module name -> weight shape (out, in[, kh, kw]) of every targeted layer of a pipeline.

    ``weight_files`` gives each component's safetensors file in the pipeline directory, ``targets`` the
    leaf names (PEFT ``target_modules`` style) to pick. Read from the headers only: no framework needed.
    """
    from ..io.safetensors_file import SafetensorsFile

    shapes: dict[str, tuple[int, ...]] = {}
    for component in components:
        weights = SafetensorsFile(Path(pipeline_dir) / weight_files[component])
        for key in weights.keys():
            path = key[: -len(".weight")] if key.endswith(".weight") else None
            if path and any(path == t or path.endswith("." + t) for t in targets[component]):
                shapes[f"{component}.{path}"] = weights.header_entry(key)[1]
    return shapes


def random_lora(shapes: dict[str, tuple[int, ...]], rank: int, alpha: float, seed: int, strength: float,
                provenance: dict[str, Any], training: dict[str, str]):
    """A seeded :class:`LoraModel` with a module per ``shapes`` entry, random non-zero A and B.

    Both factors are random (a freshly initialised LoRA has B = 0 and changes nothing), scaled so
    the update is about ``strength`` times the typical weight: strong enough to change images visibly.
    """
    import numpy as np

    from ..model import LoraModel, LoraModule
    from ..tensor import Tensor

    rng = np.random.default_rng(seed)
    model = LoraModel(provenance=provenance, training=training)
    for name, (out_features, in_features, *kernel) in shapes.items():
        # B @ A has entries of std sqrt(rank) * sa * sb; aim at strength / sqrt(in_features) (the init scale).
        sa = sb = (strength / (np.sqrt(rank) * np.sqrt(in_features)) * rank / alpha) ** 0.5
        a = rng.normal(0.0, sa, (rank, in_features, *kernel)).astype(np.float32)
        b = rng.normal(0.0, sb, (out_features, rank, *([1, 1] if kernel else []))).astype(np.float32)
        model.add(LoraModule(name, "lora", {"lora_A.weight": Tensor.from_numpy(a), "lora_B.weight": Tensor.from_numpy(b)},
                             alpha=alpha))
    return model


def save_pipeline(make_pipeline: Callable[[], Any], out: str | os.PathLike, force: bool, half: bool) -> Path:
    """Build a diffusers pipeline with ``make_pipeline()`` and save it to ``out`` whole or not at all
    (safetensors; fp16 weights when ``half``), refusing an existing ``out`` without ``force`` before building."""
    import torch

    out = Path(out)
    if out.exists() and not force:
        raise LoraBridgeError("output exists; pass --force to replace it", out)
    if not out.parent.exists():
        raise LoraBridgeError("output directory does not exist", out.parent)
    pipe = make_pipeline()
    if half:
        pipe.to(torch.float16)
    with atomic_directory(out, force) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out
