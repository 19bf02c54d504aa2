"""The Router plane: the aiohttp front door (OpenAI routes proxied to replicas), replica balancing,
its Prometheus metrics, the OpenAI protocol slice it owns and the scaling mailbox. No vLLM, no torch."""
