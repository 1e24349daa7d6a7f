"""The wire: what clients send and get back. Nothing else lives here."""

from .documents import Generation, Prompt

__all__ = ["Prompt", "Generation"]
