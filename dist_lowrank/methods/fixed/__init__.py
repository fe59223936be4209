"""Fixed-ratio baseline (Pufferfish): every layer factorized at ratio x full rank after a warm-up."""
