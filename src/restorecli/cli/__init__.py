"""The `restore` command line: Typer commands, options generated from the settings, terminal output."""

from .app import app, main

__all__ = ["app", "main"]
