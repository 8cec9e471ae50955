"""hipt-ray: HIPT for computational pathology at cluster scale on Ray."""

__version__ = "0.1.0"
