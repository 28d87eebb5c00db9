"""Single-shot detectors: SSD internals (anchors, heads) and Contrastive Relevance Propagation."""
