"""Shared services at the bottom of the house: atomic I/O, the output protocol, progress, the device rule, the environment."""
