"""The embedded default data sets, generated from a seed: phantom-histology and phantom-breast."""
