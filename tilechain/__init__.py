"""tilechain: chain pipelines of image models, streamed as tiles through gRPC stage services."""

__version__ = "0.1.0"
