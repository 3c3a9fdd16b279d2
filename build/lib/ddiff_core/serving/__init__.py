"""Serving: one pipeline holding every LoRA as a named adapter."""
