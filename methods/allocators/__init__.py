"""Allocators, one module each, registered by `@register_allocator` (`methods.registry`)."""
