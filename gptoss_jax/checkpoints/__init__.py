"""Reading and writing every checkpoint layout: the two public safetensors ones and the project's own.

- :mod:`~gptoss_jax.checkpoints.loading`: :func:`load`, a model from a folder in any layout
  (also ``gptoss_jax.load``).
- :mod:`~gptoss_jax.checkpoints.folder`: what every layout has (``config.json``), ``CheckpointError``.
- :mod:`~gptoss_jax.checkpoints.parameters`: the model's parameters by path; building a model
  from any stream of ``(path, array)``, placing each on its devices as it comes.
- :mod:`~gptoss_jax.checkpoints.layouts`: the public layouts (Hugging Face's root folder and
  OpenAI's ``original/``) and how their tensors map onto the model's parameters.
- :mod:`~gptoss_jax.checkpoints.safetensors_reader`: the streaming, validating reader of them.
- :mod:`~gptoss_jax.checkpoints.dense_experts`: expert weights saved dense (bf16, f16, f32), as
  fine-tuning recipes save them, quantized to MXFP4 by the OCP MX rule as they are read.
- :mod:`~gptoss_jax.checkpoints.safetensors_writer`: writing a model in either of them.
- :mod:`~gptoss_jax.checkpoints.hf_export`: any checkpoint written in OpenAI's published Hugging
  Face layout (``gptoss-jax convert --to hf``).
- :mod:`~gptoss_jax.checkpoints.staging`: writing a folder atomically (a hidden sibling, renamed).
- :mod:`~gptoss_jax.checkpoints.orbax_format`: the project's converted format, and restoring it.
- :mod:`~gptoss_jax.checkpoints.orbax_writer`: converting a public checkpoint into it
  (``gptoss-jax convert``; also ``gptoss_jax.convert_checkpoint``).
"""
