"""The checkpoint conversion script: ``python -m convert SRC DST``, the same as ``gptoss-jax convert SRC DST``.

A thin entry point over the library (:mod:`gptoss_jax.checkpoints`); it is not installed with the
package, whose console script ``gptoss-jax convert`` does the same.
"""
