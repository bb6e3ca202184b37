"""The process's Numba threads: the threading layer the library asks for, and their count.

``numba.get_num_threads()`` loads Numba's threading layer the first time anything calls
it, and a layer once loaded stays for the life of the process. The library's memory
estimates and work splits ask for the thread count before any kernel runs (the first
``fmm_attention_vjp`` call did, in :func:`fmm_attention.tree.fmm_call_bytes`), so the
configured layer must be in place before that first question, not only before the first
launch. Every module of the package asks through :func:`num_threads`, and
:func:`choose_layer` runs when the package is imported.
"""

import os

import numba
from numba.core import config as _numba_config

from . import _config


def loaded_layer():
    """The threading layer in use, or ``None`` before Numba has loaded one."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def choose_layer():
    """Apply ``_config.THREADING_LAYER`` unless the user has chosen a layer.

    Numba reads its setting when it loads a layer (at the first parallel launch, the first
    ``numba.get_num_threads()``, or when a cached parallel kernel is loaded), so this runs
    at import and again before each launch until a layer is loaded. Any choice of the
    user's (the environment variable, a config file, or ``numba.config.THREADING_LAYER``
    set in code) leaves Numba's setting other than ``"default"``, and is kept.
    """
    wanted = _config.THREADING_LAYER
    if wanted is None or "NUMBA_THREADING_LAYER" in os.environ or loaded_layer() is not None:
        return
    if str(_numba_config.THREADING_LAYER).lower() == "default":
        _numba_config.THREADING_LAYER = wanted


def num_threads():
    """``numba.get_num_threads()``, after the configured threading layer is applied."""
    if loaded_layer() is None:
        choose_layer()
    return numba.get_num_threads()


choose_layer()
