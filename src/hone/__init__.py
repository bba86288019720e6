"""Hone: turn a general LLM and a general text corpus into a domain specialist."""

__version__ = "0.1.0"
