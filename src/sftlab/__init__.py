"""sftlab: supervised instruction fine-tuning of chat LLMs, GLM-4 first."""

__version__ = "0.1.0"
