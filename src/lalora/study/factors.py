"""One checkpoint's Kronecker factors, as the ``fit_kfac`` stage computes them: the adapted
model on the prepared training split (:func:`lalora.models.pipeline.load_split_run`, memory checked
first) and :func:`lalora.laplace.kfac.fit_kfac` with the ``kfac`` section's settings."""

from __future__ import annotations

from pathlib import Path

from lalora.config import Params
from lalora.core.errors import NonFiniteError
from lalora.laplace import Posterior, fit_kfac
from lalora.models.pipeline import load_split_run
from lalora.runtime.distributed import SINGLE, Dist


def fit_checkpoint(
    params: Params, model_name: str, adapter: Path, train: Path, dist: Dist = SINGLE
) -> Posterior:
    """The factors (no prior yet) of ``model_name`` with the exported ``adapter`` over the
    prepared split ``train``; data parallel over ``dist``, every process returns them. A
    non-finite logit or factor is a NonFiniteError naming the model and the adapter."""
    cfg = params.kfac
    split = load_split_run(params, model_name, adapter, train, cfg.batch_size, stage="fit_kfac")
    try:
        return fit_kfac(
            split.model,
            split.batches,
            split.logits_fn,
            split.modules,
            fisher=cfg.fisher,
            rank=cfg.rank,
            max_dense=cfg.max_dense,
            update=cfg.update,
            seed=cfg.seed,
            normalisation=cfg.normalisation,
            progress=dist.main,
            dist=dist,
        )
    except NonFiniteError as err:
        raise NonFiniteError(f"{model_name} ({adapter}): {err}") from None
