"""Adapter files: the only safetensors reader/writer, and the canonical format."""
