"""A Kubernetes API server for tests: kmock's emulator with the API conventions added."""

from .emulator import KubernetesEmulator, running_emulator

__all__ = ["KubernetesEmulator", "running_emulator"]
