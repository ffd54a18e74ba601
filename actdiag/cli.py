"""The command line: click only. Parse, call the library, pick sinks, set the exit status."""

from __future__ import annotations

import click

from actdiag._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="actdiag")
def cli() -> None:
    """actdiag: find why a PyTorch network does not train (vanishing gradients, saturation, dead ReLUs, ...)."""


def main() -> None:
    cli()
