"""Packed model preparation, the transformers attention hook and the tiny model builder."""
