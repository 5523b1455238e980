"""CPU stand-in for flash_attn.utils (tests only)."""
