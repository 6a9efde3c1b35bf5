"""Teachers: specs, loading timm / local / transformers ViTs, the bundled teachers, and the ViT surface wecolora relies on."""
