"""From a model reference to a loaded model and tokenizer: resolving names, the Hugging Face
Hub, GGUF files, the models.yaml registry, and the device, dtype and BLAS policy."""
