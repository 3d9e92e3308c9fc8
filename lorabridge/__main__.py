"""``python -m lorabridge``: the same command line as the ``lorabridge`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
