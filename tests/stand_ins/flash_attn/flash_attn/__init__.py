"""CPU stand-in for flash_attn (tests only): the padding helpers OpenRLHF imports, see tests/stand_ins/README.md."""
