"""Backend adapters, one module per framework (imported as ``unitrain.backends``).

Each module imports its framework at its top; nothing imports these modules until
:func:`unitrain.get_backend` is asked for that backend.
"""
