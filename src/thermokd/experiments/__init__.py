"""Experiments on top of the engine: ``compare`` (methods × seeds with one teacher) and ``report`` (tables, plots)."""
