"""``python -m normlightning.sweep``: the sweep's command line (:mod:`normlightning.sweep.cli`)."""

from normlightning.sweep.cli import console_main

if __name__ == "__main__":
    console_main()
