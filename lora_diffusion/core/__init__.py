"""The adapter core: spec, registry, the Adapter contract, the adapted layer and the call context.

Imports only torch and the standard library.
"""
