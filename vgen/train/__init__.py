"""Training: one loop (``vgen.train.loop``) for every kind of run, and one task module per kind of model."""
