"""gateway: calls custom-lang through a circuit breaker and a retry budget."""
