"""Generation: the KV cache, samplers, the decode loop, and per-backend compilation."""
