"""memfed.registry: identities, catalog with version chains, access control, audit. Never imports torch."""
