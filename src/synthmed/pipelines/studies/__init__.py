"""The studies built on the pipelines: downstream (real vs real+synthetic training) and ablations."""
