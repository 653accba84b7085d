"""Command-line tools; each module's ``main`` is a console entry point (see setup.py) and
``tools/<name>.py`` runs it from a checkout."""
