"""Conversion tables, one module per foreign checkpoint format (see ``bertkit.checkpoints.convert``)."""
