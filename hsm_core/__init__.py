"""hsm_core: the engine behind the hsm_distributed Hydra launcher.

Kept free of imports: this package travels to remote machines with the worker.
"""

__version__ = "0.1.0"
