"""The compiled per-term loop of the sparse models (``pair_channel_sum.cpp``), built on first use.

:class:`~xfel_spread.sim.forward.PairChannelSum` sums, per (pixel, domain, Miller index) pair, a few
dozen channel terms ``exp(-2 arg) weight`` and two moments of them. Eager torch does that in about
eight passes over a padded (pairs, channels) array and evaluates every entry; on the free-domain
refinement of stage 1 that was about half a lattice's time. The C++ loop here does it in one
vectorised pass (four channels at a time, exp written out), and :class:`~xfel_spread.sim.forward.
PairQuadraticSum` also forms each pair's quadratic and its derivatives in the same call.

It is built with torch's extension builder (a C++ compiler and ninja; the Debian set-up installs
``g++``, ``python3-dev`` and ``ninja-build``, the conda environment ``cxx-compiler`` and ``ninja``)
into torch's extension directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
once per machine architecture and source: about 25 s, after which each process loads it in well under
a second. Where it cannot be built, or with ``XFEL_SPREAD_FUSED=0``, one warning says why and
the eager torch loop runs instead: the same sums to rounding (``tests/test_fused.py``), slower.
It serves float64 tensors on the CPU; CUDA tensors always take the eager loop.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sysconfig
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("pair_channel_sum.cpp")
#: Environment variable that turns the compiled loop off when set to 0.
SWITCH = "XFEL_SPREAD_FUSED"
#: A build lock older than this (s) is taken as left by a killed build and removed: torch's builder
#: would otherwise wait for it forever (a build takes 25-50 s).
STALE_LOCK_S = 300.0
#: How often (s) :func:`_wait_for_build_lock` looks at another process's lock.
LOCK_POLL_S = 1.0

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "reason": "not tried yet"}


def extension_name() -> str:
    """The extension's name, per machine architecture (a shared home directory may serve several)."""
    return f"xfel_spread_pair_channel_sum_{platform.machine().lower() or 'unknown'}"


def missing_toolchain() -> str:
    """What the build needs and this machine lacks (the C++ compiler torch would call, ninja, Python's
    headers), or '' when all are there."""
    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler})")
    if shutil.which("ninja") is None:
        missing.append("ninja")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append("Python's headers (Python.h)")
    return ", ".join(missing)


def _wait_for_build_lock(name: str) -> None:
    """Wait while another process builds the extension (its lock is younger than STALE_LOCK_S), and
    remove a lock older than that: a build killed midway (a cancelled job) leaves it behind, and torch's
    builder would wait for it forever."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            logger.warning("removed a stale build lock %s (%.0f s old; a build takes under a minute)", lock, age)
            return
        time.sleep(LOCK_POLL_S)


def _build():
    from torch.utils.cpp_extension import load

    name = extension_name()
    _wait_for_build_lock(name)
    started = time.perf_counter()
    module = load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-Wno-psabi"], verbose=False)
    logger.info("compiled pair-channel loop ready (%s, %.1f s)", name, time.perf_counter() - started)
    return module


def error_line(error: BaseException, limit: int = 300) -> str:
    """The line of a failed build's message that says what went wrong: the compiler's first
    ``error:`` line where there is one (torch's message starts with the whole command line), else
    the message's first line; at most ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = next((line for line in lines if "error:" in line), lines[0])
    return line if len(line) <= limit else line[:limit - 3] + "..."


def pair_channel_sum_module():
    """The built extension (its ``pair_channel_sum``), or None when it is off or cannot be built;
    built or loaded once per process, the first time it is asked for."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            if os.environ.get(SWITCH, "1").strip() == "0":
                _state["reason"] = f"{SWITCH}=0"
            else:
                try:
                    _state["module"] = _build()
                    _state["reason"] = ""
                except Exception as error:  # noqa: BLE001 - any failure to build falls back to eager torch
                    _state["reason"] = f"{type(error).__name__}: {error_line(error)}"
                    logger.warning("the compiled pair-channel loop is unavailable (%s); the eager torch loop "
                                   "runs instead (the same sums, slower)", _state["reason"])
            _state["tried"] = True
    return _state["module"]


def unavailable_reason() -> str:
    """Why :func:`pair_channel_sum_module` returned None ('' when it is built, 'not tried yet' before)."""
    return _state["reason"]


def reset() -> None:
    """Forget the outcome, so that the next :func:`pair_channel_sum_module` tries again (tests)."""
    with _lock:
        _state.update(tried=False, module=None, reason="not tried yet")
