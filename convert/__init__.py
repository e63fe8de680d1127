"""Converter from the public gpt-oss safetensors layouts to the project's orbax checkpoint."""

from convert.writer import convert_checkpoint

__all__ = ["convert_checkpoint"]
