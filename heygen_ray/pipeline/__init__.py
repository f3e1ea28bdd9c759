"""The end-to-end pipeline: data -> train -> tune -> compress -> serve, with a stage ledger.

Every stage unit (``data``, ``train.<entry>``, ``tune``, ``compress``, ``serve``) is planned and
validated before anything runs (`plan_pipeline`: a bad stage config fails here, naming the stage, the
file and the field). Each unit gets a content key: the sha256 of its resolved spec, the keys of the
units it consumes, the data fingerprint and the code version. `<output_dir>/ledger.json` records
each unit's key, status and outputs; a re-submitted pipeline skips a unit whose key is unchanged and
finished, resumes an unfinished training from its checkpoint (same run folder, same MLflow run), and
starts a unit afresh when its key changed. ``force`` reruns the named stages and everything
downstream. Serve always runs (a deployment does not outlive its cluster).

One MLflow parent run per pipeline submission, a child run per stage; the stages' own runs (training
runs, sweep trials, compression variants) nest under their stage's run.
"""

from heygen_ray.pipeline.plan import Ledger, Unit, code_version, data_fingerprint, downstream, plan_pipeline, unit_key
from heygen_ray.pipeline.run import PipelineRun, run_pipeline

__all__ = ["Ledger", "PipelineRun", "Unit", "code_version", "data_fingerprint", "downstream", "plan_pipeline",
           "run_pipeline", "unit_key"]
