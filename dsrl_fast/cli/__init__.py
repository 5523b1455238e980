"""The dsrl-fast command line: one module per subcommand; `main` is the console entry point (`dsrl-fast`)."""

from dsrl_fast.cli.app import main

__all__ = ["main"]
