"""dinowatch: an edge image-embedding daemon (DINOv2 ViT-S/14 -> SQLite -> MQTT)."""

__version__ = "0.3.0"

from dinowatch.embedder import DinoEmbedder

__all__ = ["DinoEmbedder", "__version__"]
