"""memfed: a federated network for the parametric memory of language models.

Knowledge in weights (LoRA and adapter modules, fact edits, steering vectors) becomes MemCubes: versioned,
signed, access-controlled units that nodes load, activate, merge, archive and exchange over MIP.
"""

__version__ = "0.1.0"
