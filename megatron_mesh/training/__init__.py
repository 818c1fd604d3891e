"""Training on Megatron's trainer: YAML -> Megatron arguments, providers, throughput logging."""
