"""Hooks into other libraries' registries (each imports its library lazily): :mod:`.timm`."""
