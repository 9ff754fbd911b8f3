"""The product without a user interface: documents, prompt layout, the turn runner every face
prefills and generates through, conversations on top of it, documents past the reach, and the
on-disk document cache."""
