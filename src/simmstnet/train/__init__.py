"""Training: masked task losses, task loss weighting, the trainer and sim2real reweighting.

Submodules are imported where used (``from simmstnet.train.losses import masked_task_losses``)
so that importing one piece does not pull in the others.
"""
