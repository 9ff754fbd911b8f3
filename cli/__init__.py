"""The `selfextend` command line: chat with, ask and summarize long documents."""
