"""Everything Ray: the worker actor, the pool that feeds it, the driver of a sweep.

`sweep/` never imports Ray; this package calls into it for the work.
"""
