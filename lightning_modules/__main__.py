"""``python -m lightning_modules``: the ``attnres`` command (the same as the console script)."""

from lightning_modules.main import main

if __name__ == "__main__":
    main()
