"""The ``memfed`` command line: the user's front door."""
