"""Make Debian's DIALS 3.12 stills indexing work without ``xfel_mono_sim_ext``.

``dials.algorithms.indexing.nave_parameters`` (used by every stills indexing run to estimate the
mosaic domain size and spread) imports ``xfel.mono_simulation.max_like`` and ``.util``. Those two
modules are pure Python, but importing them runs ``xfel/mono_simulation/__init__.py``, which loads the
compiled ``xfel_mono_sim_ext``. Debian's cctbx does not ship that extension, so the import fails, DIALS
treats the failure like any indexing error, and every shot ends "No suitable indexing solution found".

Nothing in the code path DIALS uses calls into the extension (it serves ``mono_treatment``'s bandpass
integration, which stills processing never reaches), so an empty stand-in module is enough: indexing
then gives the same result as with the compiled module. The stand-in is installed only into the
running interpreter and only when the real extension cannot be found, so a full cctbx build keeps its
own module.
"""

from __future__ import annotations

import importlib.util
import sys
import types

EXTENSION_NAME = "xfel_mono_sim_ext"


def install_mono_sim_stand_in() -> bool:
    """Register an empty ``xfel_mono_sim_ext`` in ``sys.modules`` if the compiled one is missing.

    Returns True when the stand-in was installed, False when a real (or already installed) module
    is present.
    """
    if EXTENSION_NAME in sys.modules or importlib.util.find_spec(EXTENSION_NAME) is not None:
        return False
    stand_in = types.ModuleType(
        EXTENSION_NAME,
        "Empty stand-in for cctbx's compiled xfel_mono_sim_ext (see xfel_spread.dials.compat).",
    )
    stand_in.__all__ = []
    sys.modules[EXTENSION_NAME] = stand_in
    return True
