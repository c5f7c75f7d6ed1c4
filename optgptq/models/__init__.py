"""Model definitions (Llama and BLOOM families), their loader, and default-model resolution."""
