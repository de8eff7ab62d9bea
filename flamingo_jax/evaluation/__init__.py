"""Few-shot evaluation: metrics, log-likelihood ranking, demonstration retrieval (RICES)."""
