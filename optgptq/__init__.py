"""optgptq: an Opt-GPTQ inference stack."""
