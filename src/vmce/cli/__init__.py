"""The ``vmce`` command."""
