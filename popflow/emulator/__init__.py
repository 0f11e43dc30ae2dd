"""Speculator-style photometric emulators (Alsing et al. 2020): theta -> AB magnitudes in JAX.

``Emulator.load("lsst")`` loads a shipped emulator; :mod:`popflow.emulator.train`
trains new ones from a bagpipes training store (``popflow emulator train``).
"""

from popflow.emulator.model import Emulator

__all__ = ["Emulator"]
