"""The LRP core: tracing, the graph interpreter, rules, splits, composites, quantization.

No file I/O and no plotting here."""
