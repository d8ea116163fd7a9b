"""The serving router: HAProxy balancing an InferenceService's requests over its ready replicas by
outstanding requests, configured and kept current by a small agent (docs/serving.md, "The router")."""
