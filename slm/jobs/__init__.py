"""`slm jobs`: a pipeline as Slurm jobs. `render` writes one sbatch script per stage (a job array
for scoring, multi-node DeepSpeed or torchrun for training), `submit` chains the unfinished ones
with afterok dependencies, `status` reads their states back beside the stages' outputs."""

from slm.jobs.render import RenderedJob, render_pipeline
from slm.jobs.resources import SlurmResources
from slm.jobs.status import pipeline_status
from slm.jobs.submit import submit_pipeline

__all__ = ["RenderedJob", "SlurmResources", "pipeline_status", "render_pipeline", "submit_pipeline"]
