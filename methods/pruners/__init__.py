"""Pruners, one module each, registered by `@register_pruner` (`methods.registry`)."""
