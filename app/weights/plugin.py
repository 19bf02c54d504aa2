"""vLLM plugin entry point (group ``vllm.general_plugins``, declared in pyproject.toml).

vLLM calls ``register`` in every process it starts; importing the loader module registers the
``yrllm`` load format. Nothing else happens here, so the plugin costs nothing to engines that do not
use the format.
"""


def register() -> None:
    import app.weights.loader  # noqa: F401 - registers the load format on import
