"""The engine plane: one vLLM engine per replica, in a supervised process of its own (the host), the
zygotes that fork every engine process, the engine process's main and the spec that describes an engine."""
