"""``python -m normlightning`` is the ``normlightning`` command."""

from normlightning.cli import main

if __name__ == "__main__":
    main()
