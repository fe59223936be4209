"""Where users train without calling an engine themselves: the Hugging Face Trainer and PyTorch Lightning."""
