"""Grants: the model, canonical encoding, signing and verification, bundles.

Only this package imports signing primitives.
"""
