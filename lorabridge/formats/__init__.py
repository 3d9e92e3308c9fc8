"""Formats: each module is a reader/writer pair between a file layout and :class:`~lorabridge.model.LoraModel`."""
