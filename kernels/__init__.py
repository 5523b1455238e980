"""Triton kernels and their launchers (shipped as ``dsrl_fast.kernels``). Importing a submodule imports triton."""
