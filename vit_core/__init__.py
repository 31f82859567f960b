"""ViT platform core library."""
