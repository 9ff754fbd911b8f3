"""The product without a user interface: documents, prompt layout, sessions that answer
about them, and the on-disk document cache."""
