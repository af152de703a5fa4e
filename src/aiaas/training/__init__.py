"""Training-side building blocks: the job plan, architectures, the trainer, evaluation, export.

The specs they work from (preprocessing, splits, input shapes) live in `aiaas.specs`.
"""
