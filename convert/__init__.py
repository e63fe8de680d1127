"""Converter from the public gpt-oss safetensors layouts to the project's orbax checkpoint."""

from convert.writer import ConversionWarning, convert_checkpoint

__all__ = ["ConversionWarning", "convert_checkpoint"]
