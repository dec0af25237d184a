"""The client of JAX's coordination service: the one module that reaches into
`jax._src` for it.

Why internals: jax.distributed.initialize keeps the client it connects (with the
service's key-value store, which training/peer_watchdog.py talks through) on a
private module-level object, `jax._src.distributed.global_state`, and no public API
returns it. Verified with JAX 0.10.2 (tests/test_multiprocess.py runs through it);
JAX 0.11.2's source has the same `global_state.client`. tests/test_library_adapters.py
fails, naming the symbol, if an upgrade removes it.
"""

from __future__ import annotations

from typing import Any

from t5x_like import errors

VERIFIED = "0.10.2"
_GLOBAL_STATE = "jax._src.distributed.global_state"


def coordination_client() -> Any | None:
    """The client jax.distributed.initialize connected, or None before (or without) it."""
    return _global_state().client


def check_internals() -> None:
    """Raises LibraryChangedError naming the internal the installed JAX lacks."""
    _global_state()


def _global_state() -> Any:
    state = errors.library_internal(_GLOBAL_STATE, verified=VERIFIED, adapter=__name__)
    if not hasattr(state, "client"):
        raise errors.LibraryChangedError(symbol=f"{_GLOBAL_STATE}.client",
                                         verified=VERIFIED, adapter=__name__)
    return state
