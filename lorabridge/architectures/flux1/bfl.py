"""BFL (black-forest-labs/flux, ComfyUI, kohya sd-scripts) <-> diffusers transformer module paths, as tables.

BFL numbers the transformer as ``double_blocks.N`` / ``single_blocks.N`` and names each layer of a block
its own way; diffusers has ``transformer_blocks.N`` / ``single_transformer_blocks.N``. The tables are
those of diffusers' own converter, ``convert_flux_transformer_checkpoint_to_diffusers`` in
``diffusers/loaders/single_file_utils.py`` (``tests/test_architectures_flux1.py`` runs it on a
checkpoint built from them). Paths have no ``model.diffusion_model.`` / ``diffusion_model.`` /
``transformer.`` prefix. The reverse direction is this table inverted by the architecture record
(:meth:`Architecture.from_original`), never separate code.

Two kinds of diffusers module have no BFL module of their own:

* parts of a fused layer (:data:`DOUBLE_FUSED`, :data:`SINGLE_FUSED`): BFL computes q, k and v of each
  stream with one ``qkv`` matrix, and a single block's q, k, v and MLP input with one ``linear1``;
  the record lists them as fused layers (``FUSED_LAYERS``), which split and merge exactly;
* ``norm_out.linear``: BFL's ``final_layer.adaLN_modulation.1`` computes (shift, scale), diffusers'
  ``AdaLayerNormContinuous`` (scale, shift): the converter swaps the two row halves. A LoRA there is a
  row permutation of lora_B, not a rename, so it is left unmapped (None) rather than mapped wrongly.

The RMSNorms of q and k are modules on both sides; BFL calls their parameter ``scale``, diffusers ``weight``.
"""

from __future__ import annotations

from ..fused import FusedLayer

COMPONENT = "transformer"

# Modules outside the blocks: diffusers path -> BFL path.
TOP_LEVEL = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",  # FLUX.1-schnell has no guidance embedder
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    # "norm_out.linear" -> "final_layer.adaLN_modulation.1" has its (shift, scale) halves swapped: not a rename.
}

# Layers of a double block: diffusers name under ``transformer_blocks.N.`` -> BFL name under ``double_blocks.N.``.
DOUBLE_BLOCK = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}

# Layers of a single block: diffusers name under ``single_transformer_blocks.N.`` -> BFL name under ``single_blocks.N.``.
SINGLE_BLOCK = {
    "norm.linear": "modulation.lin",
    "proj_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}

# Fused layers: BFL name in a block -> the diffusers layers it computes, in row order.
DOUBLE_FUSED: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_FUSED: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # 3072, 3072, 3072, 12288 rows in Flux.1
}

# diffusers block list -> (BFL block list, layer table, fused layers).
BLOCKS: dict[str, tuple[str, dict[str, str], dict[str, tuple[str, ...]]]] = {
    "transformer_blocks": ("double_blocks", DOUBLE_BLOCK, DOUBLE_FUSED),
    "single_transformer_blocks": ("single_blocks", SINGLE_BLOCK, SINGLE_FUSED),
}

FUSED_LAYERS = tuple(
    FusedLayer(COMPONENT, f"{bfl}.{{n}}.{fused}", tuple(f"{blocks}.{{n}}.{part}" for part in parts))
    for blocks, (bfl, _, fused_table) in BLOCKS.items() for fused, parts in fused_table.items())


def transformer_path_to_bfl(path: str) -> str | None:
    """The BFL path of a diffusers transformer path by the tables (not checked against the tree), or None.

    Example:
        >>> transformer_path_to_bfl("transformer_blocks.3.attn.to_out.0")
        'double_blocks.3.img_attn.proj'
        >>> transformer_path_to_bfl("single_transformer_blocks.0.proj_out"), transformer_path_to_bfl("x_embedder")
        ('single_blocks.0.linear2', 'img_in')
        >>> transformer_path_to_bfl("norm_out.linear") is None  # shift and scale swapped: not a rename
        True
    """
    if path in TOP_LEVEL:
        return TOP_LEVEL[path]
    blocks, _, rest = path.partition(".")
    index, _, layer = rest.partition(".")
    if blocks not in BLOCKS or not index.isdigit():
        return None
    bfl, table, _ = BLOCKS[blocks]
    return f"{bfl}.{index}.{table[layer]}" if layer in table else None
