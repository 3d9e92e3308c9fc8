"""Shared fixtures live in tests/fixtures/, one module per area, loaded here for every test file."""

pytest_plugins = [
    "tests.fixtures.core",
    "tests.fixtures.mindspore",
    "tests.fixtures.sdxl",
    "tests.fixtures.flux",
    "tests.fixtures.naming",
    "tests.fixtures.ms_ckpt",
    "tests.fixtures.mindone",
    "tests.fixtures.torch_lora",
    "tests.fixtures.lycoris",
]
