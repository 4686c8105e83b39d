"""dgemma: run, serve and fine-tune DiffusionGemma."""
