"""Containers: safetensors, MindSpore checkpoints, torch files, and safe output writing."""
