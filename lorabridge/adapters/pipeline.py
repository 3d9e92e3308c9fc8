"""Drive a pipeline (SDXL, Flux.1) the same way in diffusers and mindone.diffusers: LoRA, scheduler, sampling.

mindone.diffusers mirrors diffusers' API (``load_lora_weights``, ``set_adapters``,
``fuse_lora``, scheduler classes, the pipeline call), so this logic is written once; a
:class:`Framework` supplies the few framework-specific pieces (module walking, tensors,
random generators, the scheduler classes). What differs between architectures (scheduler table,
guidance default, negative prompt, the denoiser) is read from the pipeline's architecture record.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from ..errors import LoraBridgeError
from ..model import LoraModel
from .base_model import pipeline_architecture
from .noise import quiet_logs
from .options import SCHEDULER_TABLES, InferOptions
from .progress import step_log
from .staging import give_back_memory, is_stand_in

ADAPTER_NAME = "lorabridge"
Log = Callable[[str], None]


class Framework(Protocol):
    """What a backend contributes: how to walk modules and make tensors in its framework."""

    name: str
    schedulers: Any  # module holding the scheduler classes (diffusers or mindone.diffusers)

    def modules(self, model: Any) -> Iterator[tuple[str, Any]]: ...
    def weight_shape(self, module: Any) -> tuple[int, ...] | None: ...
    def latents(self, array: np.ndarray, pipe: Any) -> Any: ...  # in the dtype of the pipeline's denoiser
    def generator(self, seed: int) -> Any: ...


def lora_mismatches(lora: LoraModel, pipe: Any, fw: Framework, components: list[str] | None = None) -> list[str]:
    """Every LoRA module the base lacks, or whose weight shape differs from the LoRA's: one string each; only
    the modules of ``components`` when given. A :class:`~.staging.StandIn`'s modules count: shapes need no weights."""
    problems = []
    architecture = pipeline_architecture(type(pipe).__name__)
    known = architecture.components if architecture is not None else ()
    for component in lora.components if components is None else components:
        model = getattr(pipe, component, None) if component in known else None
        if is_stand_in(model):
            model = model.model  # shapes without weights
        if model is None:
            problems += [f"{m.name} (no component {component!r})" for m in lora.modules.values() if m.component == component]
            continue
        shapes = {path: fw.weight_shape(module) for path, module in fw.modules(model)}
        for m in lora.modules.values():
            if m.component != component:
                continue
            shape = shapes.get(m.path)
            if shape is None:
                problems.append(f"{m.name} (not in base)")
            elif tuple(shape) != tuple(m.weight_shape):
                problems.append(f"{m.name} (LoRA {'x'.join(map(str, m.weight_shape))}, "
                                f"base {'x'.join(map(str, shape))})")
    return problems


def _adapted(pipe: Any, fw: Framework, component: str) -> dict[str, Any]:
    """Modules of ``component`` carrying our adapter (PEFT layers in both frameworks have ``lora_A``)."""
    model = getattr(pipe, component, None)
    if model is None:
        return {}
    return {path: m for path, m in fw.modules(model) if ADAPTER_NAME in (getattr(m, "lora_A", None) or {})}


def _load_into(pipe: Any, component: str, state_dict: dict, alphas: Any, metadata: Any) -> None:
    """One component's part of the LoRA through the pipeline class's own loader for it, as its ``load_lora_weights``
    calls them (diffusers and mindone.diffusers alike): ``load_lora_into_<denoiser>`` (``unet``, ``transformer``)
    or ``load_lora_into_text_encoder`` with the component as prefix. Per component, so a pipeline loaded in halves
    (:mod:`.staging`) takes each half's part; each loader keeps only its own prefix's keys."""
    model = getattr(pipe, component)
    common = {"network_alphas": alphas, "adapter_name": ADAPTER_NAME, "metadata": metadata, "_pipeline": pipe}
    if component == inference_of(pipe).denoiser:
        getattr(pipe, f"load_lora_into_{component}")(state_dict, **{component: model}, **common)
    else:
        pipe.load_lora_into_text_encoder(state_dict, text_encoder=model, prefix=component, **common)


def apply_lora(pipe: Any, fw: Framework, lora: LoraModel, path, scale: float, fuse: bool, log: Log,
               components: tuple[str, ...] | None = None) -> dict[str, int]:
    """Load the neutral file's modules of ``components`` (default: all the LoRA adapts) through the pipeline's own
    loaders; check every module landed.

    Every module of those components is checked against the base first, a :class:`~.staging.StandIn`'s too;
    only those the pipeline holds loaded are applied (a pipeline loaded in halves: :mod:`.staging`).
    Returns the number of modules applied per component. Raises when the LoRA and the base do
    not match, listing the modules, or when a module's scaling is not the file's alpha / rank.
    """
    checked = [c for c in lora.components if components is None or c in components]
    problems = lora_mismatches(lora, pipe, fw, checked)
    if problems:
        shown = ", ".join(problems[:8]) + (f", ... (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        raise LoraBridgeError(f"LoRA does not match the base model: {len(problems)} of {len(lora.modules)} modules: {shown}", path)
    unsupported = Counter(m.kind for m in lora.modules.values() if m.kind != "lora")
    if unsupported:
        raise LoraBridgeError(f"infer loads kind 'lora' only; this file has {dict(unsupported)} modules", path)
    loading = [c for c in checked if not is_stand_in(getattr(pipe, c))]
    if not loading:
        return {}
    with quiet_logs(fw.schedulers.__name__):  # diffusers or mindone.diffusers
        # return_alphas: Flux.1's lora_state_dict returns the alphas only when asked; SDXL's always does
        state_dict, alphas, metadata = pipe.lora_state_dict(str(path.parent), weight_name=path.name, return_alphas=True,
                                                            return_lora_metadata=True)
        for component in loading:
            _load_into(pipe, component, state_dict, alphas, metadata)
    applied = {}
    for component in loading:
        layers = _adapted(pipe, fw, component)
        wanted = [m for m in lora.modules.values() if m.component == component]
        missing = [m.name for m in wanted if m.path not in layers]
        if missing:
            raise LoraBridgeError(f"{len(missing)} LoRA modules were not applied by {fw.name}: {', '.join(missing[:8])}", path)
        wrong = [m.name for m in wanted if not np.isclose(float(layers[m.path].scaling[ADAPTER_NAME]), m.scale)]
        if wrong:
            raise LoraBridgeError(f"{fw.name} applied {len(wrong)} modules with a scale other than alpha/rank: {', '.join(wrong[:8])}", path)
        applied[component] = len(wanted)
    log(f"LoRA applied ({fw.name}): " + ", ".join(f"{n} modules in {c}" for c, n in applied.items()))
    if fuse:
        pipe.fuse_lora(components=list(applied), lora_scale=scale, adapter_names=[ADAPTER_NAME])
        pipe.unload_lora_weights()  # drops the now idle LoRA layers; the merged weights stay
        log(f"LoRA fused into the base weights at scale {scale:g}")
    else:
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])
    return applied


def inference_of(pipe: Any) -> Any:
    """The :class:`~lorabridge.architectures.architecture.Inference` record of a loaded pipeline, by its class."""
    architecture = pipeline_architecture(type(pipe).__name__)
    if architecture is None or architecture.inference is None:
        raise LoraBridgeError(f"infer runs no {type(pipe).__name__}")
    return architecture.inference


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising model (SDXL's ``unet``, Flux.1's ``transformer``)."""
    return getattr(pipe, inference_of(pipe).denoiser)


def set_scheduler(pipe: Any, fw: Framework, name: str) -> None:
    """Replace the pipeline's scheduler by ``name`` in its architecture's table (see :data:`SCHEDULER_TABLES`),
    keeping the base's config."""
    table = SCHEDULER_TABLES[inference_of(pipe).schedulers]
    if name not in table:
        raise LoraBridgeError(f"--scheduler {name} does not sample {type(pipe).__name__}; choose one of: {', '.join(table)}")
    class_name, overrides, _ = table[name]
    scheduler_class = getattr(fw.schedulers, class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)


def free(pipe: Any, names: tuple[str, ...]) -> None:
    """Drop the pipeline's components ``names`` (diffusers and mindone.diffusers record them as absent) and their memory."""
    for name in names:
        setattr(pipe, name, None)
    give_back_memory()


def free_text_encoders(pipe: Any, log: Log) -> None:
    """Free the text encoders the pipeline holds, once the prompt is encoded, and say which."""
    encoders = tuple(name for name in inference_of(pipe).text_encoders if getattr(pipe, name, None) is not None)
    free(pipe, encoders)
    log(f"prompt encoded; {', '.join(encoders)} freed")


@contextmanager
def freeing_text_encoders(pipe: Any, log: Log) -> Iterator[None]:
    """Within: the text encoders are freed as soon as the pipeline's own ``encode_prompt`` has returned.

    The pipeline call encodes the prompt exactly as it always does (positive, negative, pooled: whatever
    its architecture needs, in either framework) and needs the encoders no more: SDXL's and Flux.1's
    ``__call__`` in both frameworks handle absent encoders after encoding. Wrapping ``encode_prompt``
    rather than calling it ahead keeps each pipeline's own encoding arguments out of lorabridge.
    """
    def then_free(embeddings: Any) -> Any:
        free_text_encoders(pipe, log)
        return embeddings

    with _encoding(pipe, lambda encode, *args, **kwargs: then_free(encode(*args, **kwargs))):
        yield


@contextmanager
def _encoding(pipe: Any, encoding: Callable[..., Any]) -> Iterator[None]:
    """Within: the pipeline's ``encode_prompt(*args, **kwargs)`` is ``encoding(its own encode_prompt, *args, **kwargs)``."""
    encode = pipe.encode_prompt
    pipe.encode_prompt = lambda *args, **kwargs: encoding(encode, *args, **kwargs)
    try:
        yield
    finally:
        del pipe.encode_prompt  # the class's method again


class _Encoded(Exception):
    """Stops a pipeline call once the prompt is encoded, carrying the embeddings."""

    def __init__(self, embeddings: Any):
        super().__init__("prompt encoded")
        self.embeddings = embeddings


def encode_prompt(pipe: Any, fw: Framework, options: InferOptions, latents: np.ndarray, size: tuple[int, int]) -> Any:
    """What the pipeline's ``encode_prompt`` returns for this run, from its own ``__call__`` (stopped there), so the
    encoding arguments stay each pipeline's own; the denoiser may be a :class:`~.staging.StandIn`.
    :func:`sample` takes the result as ``encoded`` in a pipeline without encoders."""
    def stop(encode: Callable[..., Any], *args, **kwargs) -> Any:
        raise _Encoded(encode(*args, **kwargs))

    try:
        with _encoding(pipe, stop):
            _call(pipe, fw, options, latents.shape[0], size, {})  # no latents: the denoiser may be a stand-in
    except _Encoded as done:
        return done.embeddings
    raise LoraBridgeError(f"{type(pipe).__name__} ran without encoding the prompt")


def _call(pipe: Any, fw: Framework, options: InferOptions, count: int, size: tuple[int, int], extra: dict[str, Any]) -> Any:
    """The pipeline's own call for this run (``count`` images), (N, H, W, 3) floats in 0..1."""
    width, height = size
    inference = inference_of(pipe)
    if options.negative_prompt is not None:  # infer refuses one where the pipeline takes none
        extra = {**extra, "negative_prompt": options.negative_prompt}
    guidance = inference.guidance_scale if options.guidance_scale is None else options.guidance_scale
    return pipe(prompt=options.prompt, num_inference_steps=options.steps, guidance_scale=guidance, width=width,
                height=height, num_images_per_prompt=count, generator=fw.generator(options.seed), output_type="np",
                return_dict=False, **extra)[0]


def sample(pipe: Any, fw: Framework, options: InferOptions, latents: np.ndarray, size: tuple[int, int],
           on_step: Callable[..., dict] | None = None, free_memory: bool = False, log: Log | None = None,
           encoded: Any = None) -> np.ndarray:
    """Run the denoising loop from ``latents`` (a progress bar per step, or a ``log`` line per step where stderr is
    no terminal: :mod:`.progress`); (N, H, W, 3) uint8 images.

    ``on_step`` is the pipelines' ``callback_on_step_end(pipe, step, timestep, kwargs) -> kwargs``.
    ``free_memory`` frees what the rest of the call no longer needs, for a one-shot run: the text encoders
    once the prompt is encoded, the denoiser after the last step (before the VAE decodes); the images are
    the same. ``encoded`` is :func:`encode_prompt`'s result, for a pipeline loaded without its encoders.
    """
    inference = inference_of(pipe)
    pipe.set_progress_bar_config(desc=f"{fw.name} denoising", disable=None)
    say: Log = log if log is not None else (lambda line: None)
    callback = step_log(options.steps, log, then=on_step) or on_step
    if free_memory:
        callback = _freeing_denoiser(inference.denoiser, callback, say)
    extra: dict[str, Any] = {"latents": fw.latents(latents, pipe)}
    if callback is not None:
        extra["callback_on_step_end"] = callback
    encoding: AbstractContextManager[None]
    if encoded is not None:
        encoding = _encoding(pipe, lambda encode, *args, **kwargs: encoded)
    else:
        encoding = freeing_text_encoders(pipe, say) if free_memory else nullcontext()
    with encoding:
        images = _call(pipe, fw, options, latents.shape[0], size, extra)
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def _freeing_denoiser(denoiser_name: str, on_step: Callable[..., dict] | None, log: Log) -> Callable[..., dict]:
    """A step-end callback that runs ``on_step`` and, after the last step, frees the denoiser: the pipelines
    (SDXL, Flux.1; both frameworks) use only the VAE after the loop."""
    def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        kwargs = on_step(pipe, step, timestep, kwargs) if on_step is not None else kwargs
        if step == pipe.num_timesteps - 1:
            free(pipe, (denoiser_name,))
            log(f"denoising done; {denoiser_name} freed before the VAE decodes")
        return kwargs
    return step_end
