"""The one core: embeddings, attention, layer, encoder, heads."""
