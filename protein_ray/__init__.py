"""protein-ray: protein localisation classification at cluster scale with Ray."""

__version__ = "0.1.0"
