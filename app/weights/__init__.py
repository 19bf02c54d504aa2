"""The weight plane: identity, manifests, tiers, the WeightCache's bookkeeping and the vLLM load format
that moves weights between a model directory, the data system and an engine. It knows nothing of
actors or HTTP, so it runs inside vLLM's processes."""
