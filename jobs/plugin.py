"""Where the fairseq plugin lives: fairseq resolves ``--user-dir`` against the current
directory, so commands this project prints name the plugin by its absolute path, and
``bild-jobs plugin-dir`` prints it for ``--user-dir $(bild-jobs plugin-dir)`` from anywhere."""
from __future__ import annotations

import importlib.util


def plugin_dir() -> str:
    """The ``bild_fairseq`` package directory, found without importing it (which loads fairseq)."""
    return importlib.util.find_spec("bild_fairseq").submodule_search_locations[0]
