"""catdog-glm: train, evaluate and serve a cat-vs-dog classifier, and self-host ChatGLM3.

Importing the package is cheap: torch, torchvision, gradio, swanlab and transformers are imported
inside the functions that need them, so `catdog --help` stays instant.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
