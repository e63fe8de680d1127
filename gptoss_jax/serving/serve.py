"""Run the server: bind first (503 while the model loads), load, say ready, stop cleanly on a signal.

On Ctrl-C or SIGTERM the engine closes first, so every running stream ends with an error event
rather than hanging, then uvicorn closes the connections and exits.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import uvicorn

from gptoss_jax.engine import Engine, constraints
from gptoss_jax.model import GptOss
from gptoss_jax.serving.app import create_app
from gptoss_jax.serving.state import ServerState
from gptoss_jax.tokenizer import Tokenizer


class _Server(uvicorn.Server):
    """uvicorn's server, which closes the engine before its own shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig, frame) -> None:
        if self._state.engine is not None:
            # Not here: this runs in a signal handler. The engine's thread finishes in its own time.
            threading.Thread(target=self._state.engine.close, daemon=True).start()
        super().handle_exit(sig, frame)


def serve(load: Callable[[], tuple[GptOss, Tokenizer]], *, model_name: str, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, engine_options: dict | None = None,
          announce: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
    """Serve until a signal. ``load`` makes the model and tokenizer (it runs after the port is bound)."""
    state = ServerState(None, model_name, api_key)
    server = _Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning"), state)

    def load_engine() -> None:
        try:
            model, tokenizer = load()
            state.tokenizer = tokenizer
            constraints.prepare(tokenizer)
            state.engine = Engine(model, tokenizer=tokenizer, **(engine_options or {}))
        except BaseException as error:  # the server stays up and says why in its 503s
            state.load_error = error
            announce(f"gptoss-jax serve: loading failed: {error}")
            server.should_exit = True
            return
        engine = state.engine
        announce(f"serving {model_name} at http://{host}:{port}/v1 ({engine.max_batch} slots x "
                 f"{engine.max_context} positions); Ctrl-C stops")

    loader = threading.Thread(target=load_engine, name="gptoss-jax-load", daemon=True)
    original_startup = server.startup

    async def startup(sockets=None) -> None:
        await original_startup(sockets)
        loader.start()

    server.startup = startup
    server.run()
    if state.engine is not None:
        state.engine.close()
    if state.load_error is not None:
        raise state.load_error
