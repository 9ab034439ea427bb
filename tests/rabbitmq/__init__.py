"""The RabbitMQ transport against a real broker, split by concern."""
