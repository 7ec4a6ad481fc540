"""JetStream interoperability tests: run in their own virtual environment (`make test-jetstream`),
because google-jetstream pulls TensorFlow. CPU only; set before jax is first imported."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (imported by seqio) is noisy at start-up

import logging  # noqa: E402

from jetstream.core import orchestrator  # noqa: E402

# Importing the orchestrator sends every log record at DEBUG to a stdout handler on the root
# logger; pytest closes that stream before JAX's exit-time debug log. Keep pytest's capture only.
logging.getLogger().removeHandler(orchestrator.handler)
logging.getLogger().setLevel(logging.WARNING)
