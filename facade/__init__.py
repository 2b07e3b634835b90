"""OpenAI REST/SSE facade over the router's gRPC services."""
