"""A pipeline YAML run locally: `load` validates it (stages, overrides, `${work_dir}`), `run` runs its stages in
order (`slm run`), `template` writes a starter pipeline for one's own corpora (`slm init pipeline`). `slm.jobs`
renders the same loaded pipeline as Slurm jobs."""

from slm.pipeline.load import builtin_recipe, load_pipeline
from slm.pipeline.run import run_pipeline

__all__ = ["builtin_recipe", "load_pipeline", "run_pipeline"]
