"""The Ingress deployment: the HTTP API (api.py) on its request bodies and errors (protocol.py).

It admits requests (auth, validation, limits), writes each job's record and runs it with the job runner
(deployments/runner.py), and answers reads, cancels and server-sent events.
"""
from .api import Ingress, app

__all__ = ["Ingress", "app"]
