"""Serving: ``core`` (shared with training and batch scoring), ``web`` (the HTTP service's
machinery), ``batch`` (batch scoring) and ``service.py`` (the BentoML service, the API)."""

#: The package version (pyproject reads it from here; the Bento carries serving/, not imgclf/).
__version__ = "0.1.0"
