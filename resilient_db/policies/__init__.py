"""The policies, one module each; import them from the package root.

The order in which they wrap a call is defined in one place: ``resilient_db._policy``.
"""
