"""Autograd functions over the Triton launchers in ``dsrl_fast.kernels``."""
