"""Models: a registry of small networks from the federated-learning literature (see `zoo`), and your own
(`register_model`)."""

from .zoo import CNN, MLP, MODELS, LogReg, ModelEntry, ResNetGN, SimpleCNN, build_model, register_model

__all__ = ["CNN", "MLP", "MODELS", "LogReg", "ModelEntry", "ResNetGN", "SimpleCNN", "build_model", "register_model"]
