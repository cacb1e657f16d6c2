"""Frontend plumbing: loading, tracing, saving, running models for checks."""
