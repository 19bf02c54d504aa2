"""The weight plane: identity, manifests, tiers and the vLLM load format that moves weights between a
model directory, the data system and an engine. It knows nothing of actors or HTTP."""
