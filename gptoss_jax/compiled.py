"""Programs compiled ahead of time, one per argument shapes, with the compile time measured apart.

The model travels as its graphdef (static) and its state (the parameters, traced), so one
program serves every model of the same structure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import jax


class CompiledByShape:
    """Ahead-of-time compiled functions by argument shapes, so compile time is measured apart.

    Safe to call from several threads: one compiles a new shape while the others wait.
    """

    def __init__(self, function: Callable, donate: tuple[str, ...], static: tuple[str, ...]):
        self._jitted = jax.jit(function, static_argnames=("graphdef", *static), donate_argnames=donate)
        self._executables: dict[Any, Any] = {}
        self._graphdefs: list[Any] = []  # distinct model structures, by index
        self._last_graphdef: tuple[Any, int] | None = None
        self._lock = threading.Lock()

    @property
    def programs(self) -> int:
        """How many programs it has compiled (one per distinct shapes and static arguments)."""
        return len(self._executables)

    def _graphdef_index(self, graphdef) -> int:
        # Hashing or comparing a model's graphdef walks its whole structure (2 ms at gpt-oss-20b's
        # size): do it once per new graphdef object (once per generate call), not at every call.
        last = self._last_graphdef
        if last is not None and last[0] is graphdef:
            return last[1]
        index = next((i for i, known in enumerate(self._graphdefs) if known == graphdef), len(self._graphdefs))
        if index == len(self._graphdefs):
            self._graphdefs.append(graphdef)
        self._last_graphdef = (graphdef, index)
        return index

    def __call__(self, graphdef, *args, **static) -> tuple[Any, float]:
        """Run the function; returns (its result, seconds spent compiling it for this call)."""
        compile_seconds = 0.0
        with self._lock:
            signature = (self._graphdef_index(graphdef), tuple(sorted(static.items())),
                         jax.tree.structure(args), tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
            executable = self._executables.get(signature)
            if executable is None:
                start = time.perf_counter()
                executable = self._jitted.lower(graphdef, *args, **static).compile()
                compile_seconds = time.perf_counter() - start
                self._executables[signature] = executable
        return executable(*args), compile_seconds


def donated(name: str) -> tuple[str, ...]:
    # The CPU backend cannot reuse donated buffers and warns when asked to.
    return () if jax.default_backend() == "cpu" else (name,)
