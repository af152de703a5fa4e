"""Training-side building blocks: preprocessing, architectures, the trainer, evaluation."""
