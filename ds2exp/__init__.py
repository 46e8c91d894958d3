"""ds2exp: Hydra-configured DeepSpeech2 experiments on MindSpore."""
import os as _os

# MindSpore's generated protobuf modules only work with the pure-Python protobuf
# implementation, and MindSpore can pick it for itself only if protobuf has not been
# imported yet. MLflow imports protobuf, so `import mlflow` before `import mindspore`
# breaks MindSpore's import. Every entry point imports ds2exp first, so choosing the
# implementation here makes the import order irrelevant.
_os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

__version__ = "0.1.0"
