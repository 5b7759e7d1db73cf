"""The conformance suite (imported as ``unitrain.conformance``): shared checks that prove an
adapter obeys the :class:`unitrain.TrainingLoop` protocol."""
