"""Training: data loading and augmentation, losses and optimizer, the trainer and its checkpoints.

Modules import JAX only inside functions where they are reached from the command line, so ``shitu --help``
stays instant; ``shitu.train.trainer.train`` is the Python entry point.
"""
