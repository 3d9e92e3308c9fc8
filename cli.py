"""Run lorabridge from a checkout: ``python cli.py <command> ...`` (same as the ``lorabridge`` command)."""

from lorabridge.cli import main

if __name__ == "__main__":
    main()
