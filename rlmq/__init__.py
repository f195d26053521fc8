"""The ``rlmq`` command: a thin entry point that imports a service only when its subcommand runs."""

__all__: list[str] = []
