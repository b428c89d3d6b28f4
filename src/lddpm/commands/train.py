"""CLI commands (placeholder until its issue lands)."""


def register(subparsers) -> None:
    """Add this group's subcommands to the `lddpm` parser."""
