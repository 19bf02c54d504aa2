"""The KV plane: KV cache blocks shared between replicas through the data system.

A vLLM KV connector (``connector``) stores every full block of a prompt's KV under a
content-addressed key (``keys``) and loads blocks that any replica stored, instead of recomputing
them. A block carries a header and a checksum (``block_format``); one that cannot be proven right is
recomputed, never used. The App keeps KV memory bounded (``ledger``) from what the engines record
(``journal``). Like the weight plane, this plane runs inside vLLM's processes and knows nothing of
the control plane, the Router, the engine host or the actors.
"""
