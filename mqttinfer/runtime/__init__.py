"""Runtime: the I/O adapters (MQTT bus, onnxruntime runner) and the roles built on them."""
