"""Ray Serve deployments of optgptq: builder, ingress, router, router actor, engine replicas."""
