"""`restore weights ...` (placeholder until the weights module lands)."""

import typer

weights_app = typer.Typer(help="List, download and verify the pinned checkpoints.", no_args_is_help=True)


@weights_app.command("list")
def list_command() -> None:
    """List the pinned checkpoints."""
    raise NotImplementedError
