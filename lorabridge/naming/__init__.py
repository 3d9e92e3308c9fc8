"""Key grammars: how each format spells a LoRA tensor's name, parsed and spelled as tables."""

# Parsed keys remembered per grammar (lru_cache): a LoRA's keys are parsed several times (format detection, where
# every grammar tried scans them all; the architecture vote; grouping), and a library's files mostly share their
# keys; a SDXL LoRA has at most ~2,300.
PARSED_KEYS_KEPT = 1 << 14
