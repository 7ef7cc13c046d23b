"""perft: Parameter-Efficient Routed Fine-Tuning (PERFT) for Mixture-of-Experts language models."""

__version__ = "0.1.0"
