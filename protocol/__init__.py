"""Wire formats shared by the Fleet agent and coordinator, and the decoder of vLLM's KV events."""
