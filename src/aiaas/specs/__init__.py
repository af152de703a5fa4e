"""The specs every layer shares: what a dataset, its preprocessing and a training job look like.

Value types and their pure rules, with no torch, no database and no HTTP: the dataset vocabulary
(`types`: tasks, column types, splits), the train/validation/test split (`splits`), preprocessing
steps with how they are fitted and applied (`preprocessing`, `features`), the input shapes and
architecture options of a network (`shapes`), the hyperparameters a request may choose
(`hyperparameters`) and a fine-tuning job's parsed create request (`jobs`). Data building,
training, serving engines, the protocol and edge bundles all read them from here, so this package
imports nothing of aiaas above errors, ids and domain.
"""
