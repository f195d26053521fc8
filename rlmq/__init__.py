"""rlmq, the one installed name: rlmq.protocol, rlmq.lmhandler, rlmq.sandbox, rlmq.orchestrator and
the tools (rlmq.loadtest, rlmq.fakeprovider) live under it; `rlmq.cli` is the command."""

__all__: list[str] = []
