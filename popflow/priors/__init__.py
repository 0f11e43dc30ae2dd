"""Population priors over a :class:`~popflow.params.ParameterSpace`.

Every prior has ``.space``, ``.id`` (content hash of its artifact), ``log_prob(theta)``
(physical, normalised over the parameter box, -inf outside), ``log_prob_latent(phi)``,
``sample(key, n)`` and ``save(dir)``; :func:`load_prior` reads any of them back.

- :class:`AnalyticPrior` — the Prospector-alpha-like pop-cosmos baseline.
- :class:`DiffusionPrior` — score-based diffusion model, exact probability-flow ODE log-density.
- :class:`FlowPrior` — small normalising flow distilled from another prior (the fast path).
"""

from __future__ import annotations

from popflow.artifacts import load_artifact, resolve_artifact
from popflow.priors.analytic import AnalyticPrior
from popflow.priors.base import Prior
from popflow.priors.diffusion import DiffusionPrior, train_diffusion_prior
from popflow.priors.distilled import FlowPrior, distill, train_flow_prior

__all__ = ["Prior", "AnalyticPrior", "DiffusionPrior", "FlowPrior", "load_prior", "train_diffusion_prior", "train_flow_prior", "distill"]

KINDS = {cls.kind: cls for cls in (AnalyticPrior, DiffusionPrior, FlowPrior)}


def load_prior(name_or_path) -> Prior:
    """Load a prior artifact folder, or a shipped prior by name (``popflow/models/priors/<name>``)."""
    path = resolve_artifact(name_or_path, "priors")
    meta, arrays, _ = load_artifact(path)
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{path}/model.json: unknown prior kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind].from_artifact(meta, arrays)
