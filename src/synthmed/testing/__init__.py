"""Writers of small source-format fixtures in each data set's exact official layout.

Used by the tests (round trips, leakage, bad input) and by benchmarks/prepare.py (at real
image sizes). Each module `synthmed.testing.<format>` has
`write(root, *, seed=0, scale="small") -> list[dict]`, returning what it wrote.
"""
