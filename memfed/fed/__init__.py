"""Federated shared modules on Flower: exact LoRA aggregation, admission by the registry, publishing."""
