"""stable_megatron: stable LLM pre-training on megatron-core + DeepSpeed."""
