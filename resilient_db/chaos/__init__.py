"""The chaos harness: inject real faults, run scenarios, check invariants.

It uses the public API of resilient-db and is never imported by the core.
"""
