"""Hone's model layer: the Llama implementation, its fused loss, HF and GGUF reading and writing."""
