"""The user's flow as Python functions, one per CLI command: thin wiring over the layers below.

prepare -> train (backbone | controlnet) -> generate -> evaluate -> report; `run` chains them for an
experiment (EXPERIMENTS), `demo` runs the embedded default end to end, and the studies live in studies/.
"""

from synthmed.pipelines.evaluate import evaluate, roundtrip
from synthmed.pipelines.generate import generate
from synthmed.pipelines.prepare import PHANTOM, prepare
from synthmed.pipelines.report import ablation_report, report, study_report
from synthmed.pipelines.run import EXPERIMENTS, demo, demo_config, run
from synthmed.pipelines.studies.downstream import downstream
from synthmed.pipelines.train import train_backbone, train_controlnet

__all__ = ["EXPERIMENTS", "PHANTOM", "ablation_report", "demo", "demo_config", "downstream", "evaluate", "generate", "prepare", "report", "roundtrip", "run",
           "study_report", "train_backbone", "train_controlnet"]
