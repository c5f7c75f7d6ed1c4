"""Serving-side pure Python: OpenAI wire formats, the prefix index and router scoring, metrics,
and the generated gRPC stubs (from deployments/optgptq.proto)."""
