"""Training data: mock tokens, indexed datasets, packed chat conversations, tokenizers."""
