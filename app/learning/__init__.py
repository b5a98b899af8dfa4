"""Making heads and extractors: features (and their cache), training, export and INT8 quantization,
weights, training jobs over HTTP and their uploads. May use the serving layer (training scores
through the inference core; jobs extract through the service's batcher)."""
