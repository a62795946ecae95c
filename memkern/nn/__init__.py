"""Thin ``nn.Module`` wrappers over memkern's public ops."""

__all__: list[str] = []
