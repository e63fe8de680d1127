"""The OpenAI-compatible server: ``create_app`` over a :class:`ServerState` (see :mod:`gptoss_jax.serving.app`)."""
